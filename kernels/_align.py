"""Alignment hints for kernels whose rows start at non-power-of-two offsets (head_dim 72)."""

from __future__ import annotations

import math

from torch import Tensor


def common_alignment(tensors: list[Tensor], strides: list[int], cap: int = 16) -> int:
    """Largest power of two (<= cap) dividing every stride and every base address, in elements.

    Triton only learns divisibility by 16 from integer arguments, so a head stride of 72 would hide that
    every row starts on a 16-byte boundary; the kernels pass this back as `tl.multiple_of` hints, which
    is what lets them issue 16-byte vector loads.
    """
    g = cap
    for s in strides:
        g = math.gcd(g, int(s))
    for t in tensors:
        g = math.gcd(g, t.data_ptr() // t.element_size())
    return max(1, 1 << (g.bit_length() - 1)) if g else cap
