"""Float8 (e4m3) linears for inference: per-token activation scales, per-output-channel weight scales.

Hopper multiplies float8 at twice its bf16 rate. A linear y = x W^T + b runs as
    y[m, n] = (sum_k q_x[m, k] q_w[n, k]) * s_x[m] * s_w[n] + b[n]
with q = round(value / s) to e4m3 and s = amax / 448 over the row (a token of x, an output channel of W), so
each row uses the whole e4m3 range. `torch._scaled_mm` applies both scales and the bias in its epilogue.

The activation side is quantized by one Triton pass per row (`quantize_rows`), optionally fused with the
tanh GELU that sits between the MLP's two linears; `ca2vdm.kernels.adaln` fuses it into the modulated LayerNorm and
the gated residual add, whose outputs feed a linear directly.

Rounding: a GPU's float8 conversion rounds to nearest even and saturates, as torch's
`.to(torch.float8_e4m3fn)` does. The Triton interpreter's conversion mis-rounds some values (126 -> 64), so
under the interpreter (CPU tests) the kernels first round onto the e4m3 grid in fp32 arithmetic
(`round_e4m3`), which makes the cast exact there; a GPU skips those instructions.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
_MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero


def emulate_rounding() -> bool:
    """Under the Triton interpreter the kernels round onto the e4m3 grid themselves (see above)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def round_e4m3(v):
    """fp32 -> the nearest e4m3 value (ties to even, saturating at +-448), still held in fp32."""
    bits = v.to(tl.int32, bitcast=True)
    # keep 3 of the 23 mantissa bits: add just under half an e4m3 ulp (plus the kept lsb: ties to even) and
    # clear the 20 dropped bits; a carry out of the mantissa correctly bumps the exponent
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # below 2^-6 e4m3 is subnormal with a fixed step of 2^-9: round |v| on that grid (1.5 * 2^23 trick) and
    # put the sign back (so -0 and tiny negatives give torch's -0)
    subnormal = ((tl.abs(v) * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    subnormal = tl.where(bits < 0, -subnormal, subnormal)
    r = tl.where(tl.abs(v) < 0.015625, subnormal, normal)
    return tl.minimum(tl.maximum(r, -448.0), 448.0)


@triton.jit
def to_e4m3(x, Out, EMULATE: tl.constexpr):
    """fp32 values (already within +-448 up to rounding) -> Out's float8 element type."""
    if EMULATE:
        x = round_e4m3(x)
    return x.to(Out.dtype.element_ty)


@triton.jit
def row_scale(x):
    """(scale, 1 / scale) of a row's fp32 values: scale = amax / 448 (values outside the row must be 0)."""
    amax = tl.maximum(tl.max(tl.abs(x), 0), 1e-12)
    return amax / 448.0, 448.0 / amax


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))  # capped: exp(80) is already "infinite" here


@triton.jit
def _quantize_rows_kernel(X, Out, Scale, K, stride_x, GELU: tl.constexpr, EMULATE: tl.constexpr,
                          BLOCK_K: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = gelu_tanh(x)  # gelu(0) = 0: the masked lanes stay out of the amax
    scale, inv = row_scale(x)
    tl.store(Out + row * K + offs, to_e4m3(x * inv, Out, EMULATE), mask=mask)
    tl.store(Scale + row, scale)


class Fp8Rows(NamedTuple):
    """A quantized activation: `data` (M, K) e4m3 and `scale` (M, 1) fp32 for the rows of a tensor whose
    leading dimensions were `shape` (M = prod(shape))."""

    data: Tensor
    scale: Tensor
    shape: tuple[int, ...]

    def dequantize(self) -> Tensor:
        return (self.data.float() * self.scale).view(*self.shape, -1)


def empty_fp8_rows(m: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Uninitialised (M, K) e4m3 data and (M, 1) fp32 scales, for a kernel that quantizes M rows."""
    return torch.empty((m, k), device=device, dtype=FP8), torch.empty((m, 1), device=device, dtype=torch.float32)


def quantize_rows(x: Tensor, gelu: bool = False, use_triton: bool | None = None) -> Fp8Rows:
    """Quantize each row (last axis) of x to e4m3 with its own scale; `gelu` applies the tanh GELU first.
    Triton on CUDA by default, the torch reference otherwise."""
    if not (x.is_cuda if use_triton is None else use_triton):
        return quantize_rows_reference(x, gelu)
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out, scale = empty_fp8_rows(m, k, x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](rows, out, scale, k, rows.stride(0), GELU=gelu, EMULATE=emulate_rounding(),
                                BLOCK_K=block, num_warps=8 if block >= 4096 else 4)  # fmt: skip
    return Fp8Rows(out, scale, tuple(x.shape[:-1]))


def quantize_rows_reference(x: Tensor, gelu: bool = False) -> Fp8Rows:
    rows = x.reshape(-1, x.shape[-1]).float()
    if gelu:
        rows = torch.nn.functional.gelu(rows, approximate="tanh")
    amax = rows.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX)
    data = (rows * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)  # as the kernels: times 1 / scale
    scale = amax / E4M3_MAX
    return Fp8Rows(data, scale, tuple(x.shape[:-1]))


class Fp8Linear(nn.Module):
    """Inference-only stand-in for an `nn.Linear`: e4m3 weights with one scale per output channel.

    Takes a tensor (quantized here, one pass) or `Fp8Rows` from a fused producer; returns `out_dtype`.
    Buffers, not parameters: nothing here trains, and `model.to(dtype)` must not touch them.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=_MIN_AMAX) / E4M3_MAX  # (N,)
        self.register_buffer("weight", (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8))  # (N, K)
        self.register_buffer("weight_scale", scale[None].contiguous())  # (1, N)
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.out_dtype = out_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        return cls(linear.weight, linear.bias, linear.weight.dtype)

    def forward(self, x: Tensor | Fp8Rows, rows: slice | None = None) -> Tensor:
        """y = x W^T + b; `rows` restricts the output to a contiguous range of output channels (the query
        third of a fused qkv)."""
        q = x if isinstance(x, Fp8Rows) else quantize_rows(x)
        w, ws, b = self.weight, self.weight_scale, self.bias
        if rows is not None:
            w, ws = w[rows], ws[:, rows]
            b = None if b is None else b[rows]
        if q.data.is_cuda:
            y = torch._scaled_mm(q.data, w.t(), scale_a=q.scale, scale_b=ws, bias=b, out_dtype=self.out_dtype,
                                 use_fast_accum=True)  # fmt: skip
        else:  # CPUs (tests): the same product from the dequantized operands (CPU _scaled_mm lacks row scales)
            bias = None if b is None else b.float()
            y = torch.nn.functional.linear(q.data.float() * q.scale, w.float() * ws.t(), bias).to(self.out_dtype)
        return y.view(*q.shape, -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3"


# the linears of every block that run in float8; the embedders, the adaLN tables' MLP (t_block), the first
# block's mask-channel merge and the final layer stay in the model dtype (small, and closest to the data)
FP8_LINEARS = ("attn.qkv", "attn.proj", "attn_cf.qkv", "attn_cf.proj", "attn_temp.qkv", "attn_temp.proj",
               "mlp.fc1", "mlp.fc2")  # fmt: skip


def quantize_model_(model: nn.Module) -> int:
    """Replace the block linears of a loaded model by `Fp8Linear`s in place; returns how many. Run it after
    the model is on its device and in its dtype."""
    count = 0
    for block in model.blocks:  # type: ignore[union-attr]
        for path in FP8_LINEARS:
            parent_name, leaf = path.split(".")
            parent = getattr(block, parent_name, None)
            if parent is None or not isinstance(getattr(parent, leaf, None), nn.Linear):
                continue
            setattr(parent, leaf, Fp8Linear.from_linear(getattr(parent, leaf)))
            count += 1
    return count
