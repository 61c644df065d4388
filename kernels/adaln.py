"""Fused adaLN elementwise chains (Triton) and their torch references.

The residual stream is (B, T, S, C); per-frame modulation vectors (shift, scale, gate) are (B, T, 1, C)
and broadcast over the S tokens of their frame. Eagerly, `LayerNorm(x) * (1 + scale) + shift` and
`x + gate * y` are 2-3 passes each through PyTorch's strided broadcasting kernel; here each is one pass
with fp32 arithmetic and a single rounding.

Inputs are viewed as rows of C values: x, y, out as (B*T*S, C) with a uniform row stride; shift, scale,
gate as (B*T, C) (row r of the stream uses modulation row r // S).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _modulated_norm_kernel(X, Shift, Scale, Out, tokens_per_frame, C, stride_x, stride_o, stride_m, eps,
                           BLOCK_C: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    frame = row // tokens_per_frame
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    diff = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 0) / C + eps)
    shift = tl.load(Shift + frame * stride_m + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(Scale + frame * stride_m + offs, mask=mask, other=0.0).to(tl.float32)
    out = diff * rstd * (1.0 + scale) + shift
    tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _gated_add_kernel(X, Gate, Y, Out, tokens_per_frame, C, stride_x, stride_y, stride_o, stride_m,
                      BLOCK_C: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    frame = row // tokens_per_frame
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(X + row * stride_x + offs, mask=mask).to(tl.float32)
    y = tl.load(Y + row * stride_y + offs, mask=mask).to(tl.float32)
    g = tl.load(Gate + frame * stride_m + offs, mask=mask).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (x + g * y).to(Out.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> int | None:
    """Row stride of a (B, T, S, C) tensor seen as (B*T*S, C) rows, or None if it is not such a view."""
    b, f, s, c = t.shape
    if t.stride(3) != 1 or t.stride(1) != s * t.stride(2) or t.stride(0) != f * t.stride(1):
        return None
    return t.stride(2)


def _mod_rows(m: Tensor, b: int, f: int) -> int | None:
    """Row stride of a (B, T, 1, C) modulation tensor seen as (B*T, C) rows, or None."""
    if m.shape[:3] != (b, f, 1) or m.stride(3) != 1 or m.stride(0) != f * m.stride(1):
        return None
    return m.stride(1)


def _differentiating(*tensors: Tensor) -> bool:
    """The Triton kernels have no backward: when autograd records, the torch reference runs instead."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def modulated_norm(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, use_triton: bool | None = None
) -> Tensor:
    """LayerNorm(x) (no affine) * (1 + scale) + shift. x (B, T, S, C); shift, scale (B, T, 1, C).
    Triton on CUDA by default (`use_triton`), the torch reference otherwise, for other layouts or in training."""
    b, f, s, c = x.shape
    sx, sm = _rows(x), _mod_rows(shift, b, f)
    if (
        sx is None
        or sm is None
        or _mod_rows(scale, b, f) != sm
        or not (x.is_cuda if use_triton is None else use_triton)
        or _differentiating(x, shift, scale)
    ):
        return modulated_norm_reference(x, shift, scale, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _modulated_norm_kernel[(b * f * s,)](
        x, shift, scale, out, s, c, sx, c, sm, eps, BLOCK_C=triton.next_power_of_2(c), num_warps=4
    )
    return out


def gated_add(x: Tensor, gate: Tensor, y: Tensor, use_triton: bool | None = None) -> Tensor:
    """x + gate * y. x, y (B, T, S, C); gate (B, T, 1, C). Triton on CUDA by default, as above."""
    b, f, s, c = x.shape
    sx, sy, sm = _rows(x), _rows(y), _mod_rows(gate, b, f)
    if (
        sx is None
        or sy is None
        or sm is None
        or y.shape != x.shape
        or not (x.is_cuda if use_triton is None else use_triton)
        or _differentiating(x, gate, y)
    ):
        return gated_add_reference(x, gate, y)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _gated_add_kernel[(b * f * s,)](
        x, gate, y, out, s, c, sx, sy, c, sm, BLOCK_C=triton.next_power_of_2(c), num_warps=4
    )
    return out


def modulated_norm_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_add_reference(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate * y
