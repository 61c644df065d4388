"""A text condition as the model consumes it (text-conditioned models: cross-attention to caption features)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

MAX_GUIDANCE_SCALE = 50.0


@dataclass(frozen=True, eq=False)
class Prompt:
    """A text condition: the prompt, its encoded caption features (the text encoder's raw output, `y` (L, C) float
    and token `mask` (L,) with 1 on real tokens, L the model's token length) and the classifier-free guidance scale.
    A guided prompt (scale > 1) costs its session a second row in every forward: the unconditional branch (the
    model's null caption), with a cache of its own."""

    text: str
    y: Tensor
    mask: Tensor
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.y.dim() != 2 or self.mask.shape != self.y.shape[:1]:
            raise ValueError(f"prompt features must be y (L, C) and mask (L,), got {tuple(self.y.shape)} and "
                             f"{tuple(self.mask.shape)}")  # fmt: skip
        if not 1.0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"guidance_scale must be in [1, {MAX_GUIDANCE_SCALE:g}]")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0
