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

from .fp8 import Fp8Rows, empty_fp8_rows, emulate_rounding, quantize_rows_reference, row_scale, to_e4m3


@triton.jit
def _modulated_norm_kernel(X, Shift, Scale, Out, OutScale, tokens_per_frame, C, stride_x, stride_o, stride_m, eps,
                           QUANT: tl.constexpr, EMULATE: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
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
    if QUANT:  # e4m3 with a per-row scale, for a float8 linear (kernels/fp8.py); masked lanes hold 0
        out_scale, inv = row_scale(out)
        tl.store(OutScale + row, out_scale)
        tl.store(Out + row * stride_o + offs, to_e4m3(out * inv, Out, EMULATE), mask=mask)
    else:
        tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _gated_add_kernel(X, Gate, Y, Out, QOut, QScale, tokens_per_frame, C, stride_x, stride_y, stride_o, stride_m,
                      QUANT: tl.constexpr, EMULATE: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    frame = row // tokens_per_frame
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(Gate + frame * stride_m + offs, mask=mask, other=0.0).to(tl.float32)
    out = (x + g * y).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + offs, out, mask=mask)
    if QUANT:  # also the e4m3 rows of the (rounded) result, which the next float8 linear reads
        out = out.to(tl.float32)
        q_scale, inv = row_scale(out)
        tl.store(QScale + row, q_scale)
        tl.store(QOut + row * C + offs, to_e4m3(out * inv, QOut, EMULATE), mask=mask)


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
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, use_triton: bool | None = None, quantize: bool = False
) -> Tensor | Fp8Rows:
    """LayerNorm(x) (no affine) * (1 + scale) + shift. x (B, T, S, C); shift, scale (B, T, 1, C).
    Triton on CUDA by default (`use_triton`), the torch reference otherwise, for other layouts or in training.
    `quantize`: return the result as e4m3 rows with per-row scales (computed from the fp32 values)."""
    b, f, s, c = x.shape
    sx, sm = _rows(x), _mod_rows(shift, b, f)
    if (
        sx is None
        or sm is None
        or _mod_rows(scale, b, f) != sm
        or not (x.is_cuda if use_triton is None else use_triton)
        or _differentiating(x, shift, scale)
    ):
        if quantize:
            return quantize_rows_reference(modulated_norm_reference(x.float(), shift.float(), scale.float(), eps))
        return modulated_norm_reference(x, shift, scale, eps)
    rows = b * f * s
    if quantize:
        out, out_scale = empty_fp8_rows(rows, c, x.device)
    else:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        out_scale = out  # unused
    _modulated_norm_kernel[(rows,)](
        x, shift, scale, out, out_scale, s, c, sx, c, sm, eps,
        QUANT=quantize, EMULATE=emulate_rounding(), BLOCK_C=triton.next_power_of_2(c), num_warps=4,
    )  # fmt: skip
    return Fp8Rows(out, out_scale, (b, f, s)) if quantize else out


def gated_add(
    x: Tensor, gate: Tensor, y: Tensor, use_triton: bool | None = None, quantize: bool = False
) -> Tensor | tuple[Tensor, Fp8Rows]:
    """x + gate * y. x, y (B, T, S, C); gate (B, T, 1, C). Triton on CUDA by default, as above.
    `quantize`: also return the result as e4m3 rows (for a float8 linear that reads it)."""
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
        out = gated_add_reference(x, gate, y)
        return (out, quantize_rows_reference(out)) if quantize else out
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    q, q_scale = empty_fp8_rows(b * f * s, c, x.device) if quantize else (out, out)
    _gated_add_kernel[(b * f * s,)](
        x, gate, y, out, q, q_scale, s, c, sx, sy, c, sm,
        QUANT=quantize, EMULATE=emulate_rounding(), BLOCK_C=triton.next_power_of_2(c), num_warps=4,
    )  # fmt: skip
    return (out, Fp8Rows(q, q_scale, (b, f, s))) if quantize else out


def modulated_norm_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_add_reference(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate * y
