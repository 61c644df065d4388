"""The autoregressive generation loop: condition frame -> cache -> chunk after chunk.

Each autoregression step denoises one chunk against the cache (every denoising step reads the same
cached K/V) and then writes the finished chunk into the cache with one t=0 forward. Frames written to the
cache may first be perturbed to a small noise level (the reference's prefix perturbation, t_p = 50 of
1000), which the model was trained with to tolerate its own accumulated errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from .cache import DenseKVCache
from .codecs import frames_to_uint8, uint8_to_frames
from .diffusion import Sampler, classifier_free_guidance
from .loader import Pipeline
from .prompt import Prompt
from .stdit import CausalSTDiT


def perturb_for_cache(latents: Tensor, sampler: Sampler, t_p: int, gen: torch.Generator) -> Tensor:
    """Prefix perturbation: noise clean frames to the respaced index of t_p before they are cached."""
    k = sampler.perturb_index(t_p) if t_p > 0 else None
    if k is None:
        return latents
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    return sampler.q_sample(latents, torch.full((latents.shape[0],), k, device=latents.device), noise)


class Conditioner:
    """A text model's rows for one video: the prompt's caption (the null caption without one), and with guidance
    an unconditional row first (the null caption under the prompt's token mask: the reference's doubled batch).
    `write` and `denoise` run the model on those rows; `denoise` returns the guided output (one row)."""

    def __init__(self, model: CausalSTDiT, prompt: Prompt | None) -> None:
        self.model, self.prompt = model, prompt
        self.rows = 1 if prompt is None or not prompt.guided else 2
        self.set_prompt(prompt)

    def set_prompt(self, prompt: Prompt | None) -> None:
        model = self.model
        if model.y_embedder is None:
            if prompt is not None:
                raise ValueError("this model takes no text prompt")
            self.y = self.mask = None
            return
        if prompt is not None and (2 if prompt.guided else 1) != self.rows:
            raise ValueError("a prompt switch keeps the guidance scale")
        null = model.y_embedder.y_embedding
        y = null if prompt is None else prompt.y.to(null.device, null.dtype)
        mask = torch.ones(null.shape[0], dtype=torch.long, device=null.device) if prompt is None else prompt.mask
        mask = mask.to(null.device)
        self.prompt = prompt
        self.y = torch.stack([null, y] if self.rows == 2 else [y])
        self.mask = torch.stack([mask] * self.rows)

    def cache(self, max_frames: int) -> DenseKVCache:
        return DenseKVCache.for_model(self.model, batch_size=self.rows, max_frames=max_frames)

    def write(self, cache: DenseKVCache, x: Tensor) -> None:
        self.model.write(cache, x.expand(self.rows, *x.shape[1:]), self.y, self.mask)

    def denoise(self, cache: DenseKVCache, x: Tensor, t: Tensor) -> Tensor:
        out = self.model.denoise(cache, x.expand(self.rows, *x.shape[1:]), t.expand(self.rows), self.y, self.mask)
        if self.rows == 1:
            return out
        assert self.prompt is not None
        return classifier_free_guidance(out[1:], out[:1], self.prompt.guidance_scale)


@torch.no_grad()
def generate_clips(
    pipe: Pipeline, sampler: Sampler, *, image: Tensor | None, num_frames: int, seed: int,
    prompt: Prompt | None = None,
) -> Iterator[Tensor]:  # fmt: skip
    """Yield clips of uint8 frames (n, H, W, 3) until `num_frames` frames were produced.

    `image` (H, W, 3) uint8 at the pipeline's frame size becomes frame 0 (as the codec reconstructs it);
    without it the model's <BOV> frame seeds the cache and every frame is generated. `prompt`: a text model's
    condition (see `Conditioner`).
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    cfg, model, dev = pipe.config, pipe.model, pipe.device
    if image is not None and tuple(image.shape) != (*pipe.frame_size, 3):
        raise ValueError(f"image must be {(*pipe.frame_size, 3)} uint8, got {tuple(image.shape)}")
    sampler = sampler.to(dev)
    gen = torch.Generator(dev).manual_seed(seed)
    text = Conditioner(model, prompt)
    cache = text.cache(cfg.max_cache_frames)

    # 1. the condition frame
    if image is not None:
        first = pipe.codec.encode(uint8_to_frames(image[None, None].to(dev)))  # (1, C, 1, h, w)
        yield frames_to_uint8(pipe.codec.decode(first))[0]
        produced = 1
    else:
        first = model.bov_token[None, :, None].float()  # (1, C, 1, h, w)
        produced = 0
    text.write(cache, perturb_for_cache(first, sampler, cfg.prefix_perturb_t, gen))

    # 2. chunk after chunk
    c, (h, w) = cfg.model.in_channels, cfg.model.input_size[1:]
    while produced < num_frames:
        noise = torch.randn((1, c, cfg.chunk_frames, h, w), generator=gen, device=dev)
        chunk = sampler.sample_loop(lambda x, t: text.denoise(cache, x, t), noise, generator=gen)
        n = min(cfg.chunk_frames, num_frames - produced)
        if produced + n < num_frames:  # the last chunk's K/V would never be read
            text.write(cache, perturb_for_cache(chunk, sampler, cfg.prefix_perturb_t, gen))
        yield frames_to_uint8(pipe.codec.decode(chunk[:, :, :n]))[0]
        produced += n


def generate_video(
    pipe: Pipeline,
    sampler: Sampler,
    *,
    image: Tensor | None,
    num_frames: int,
    seed: int,
    prompt: Prompt | None = None,
    progress: bool = False,
    on_clip: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """All frames (num_frames, H, W, 3) uint8, with an optional progress bar over frames."""
    clips = []
    with tqdm(total=num_frames, unit="frame", disable=not progress, desc="generating") as bar:
        for clip in generate_clips(pipe, sampler, image=image, num_frames=num_frames, seed=seed, prompt=prompt):
            clips.append(clip.cpu())
            bar.update(clip.shape[0])
            if on_clip is not None:
                on_clip(clip)
    return torch.cat(clips)
