"""Float8 linears: the quantization kernels against their torch references (interpreted on CPU, compiled on
GPUs), the rounding against torch's own e4m3 cast, and a float8 model against its full-precision self."""

from __future__ import annotations

import pytest
import torch

from ca2vdm.kernels.adaln import gated_add, modulated_norm
from ca2vdm.kernels.fp8 import E4M3_MAX, FP8, Fp8Linear, Fp8Rows, quantize_rows, quantize_rows_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bits(q: Fp8Rows) -> torch.Tensor:
    """The e4m3 bit patterns, with -0 read as +0 (a GPU's conversion may drop the sign of a zero)."""
    bits = q.data.view(torch.uint8)
    return torch.where(bits == 0x80, torch.zeros_like(bits), bits)


def _rows(seed: int, m: int = 37, k: int = 200) -> torch.Tensor:
    """Rows spanning five decades of magnitude, one all-zero row and one with a lone tiny value."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]
    x[4] = 0
    x[3, 5] = 1e-9
    return x.to(DEVICE)


def test_rounding_is_torchs_e4m3_cast_for_every_value_class():
    """Every e4m3 value, the midpoints between neighbours (ties go to even), subnormals and values past
    448 (saturate): the kernel's fp32 rounding must give the bits torch's cast gives."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()  # sorted, -448 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids + 1e-6 * mids.abs(), mids - 1e-6 * mids.abs(), torch.tensor([500.0, -1e4])])
    # one row per value, scaled so that 448 (the row's amax) maps to itself: the scale is exactly 1
    rows = torch.stack([values, torch.full_like(values, E4M3_MAX)], dim=1).to(DEVICE)
    out = quantize_rows(rows, use_triton=True)
    ref = quantize_rows_reference(rows)
    assert torch.equal(out.scale, ref.scale)
    ok = (_bits(out) == _bits(ref)).all(dim=1)
    assert ok.all(), f"{(~ok).sum()} values round differently, e.g. {values[~ok.cpu()][:5].tolist()}"


def test_quantize_rows_matches_the_reference():
    x = _rows(0)
    out, ref = quantize_rows(x, use_triton=True), quantize_rows_reference(x)
    assert out.data.dtype == FP8 and out.scale.shape == (37, 1) and out.shape == (37,)
    torch.testing.assert_close(out.scale, ref.scale, rtol=1e-6, atol=0)
    assert (_bits(out) == _bits(ref)).float().mean() > 0.999  # a GPU's fp32 division may flip a rare tie
    assert (out.dequantize() - ref.dequantize()).abs().max() <= ref.scale.max() * 32  # at most one e4m3 step
    assert torch.equal(_bits(out)[4], torch.zeros_like(_bits(out)[4]))  # the zero row stays zero, no NaN


def test_dequantized_rows_are_within_half_an_e4m3_step():
    x = _rows(1)
    q = quantize_rows(x, use_triton=True)
    err = (q.dequantize() - x).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, absolute <= 2^-10 * scale below
    bound = torch.maximum(x.abs() * 2**-4, q.scale * 2**-10) * (1 + 1e-5)
    assert (err <= bound).all()


def test_fused_gelu_quantization_matches_the_reference():
    x = _rows(2, k=4608 // 16)
    out, ref = quantize_rows(x, gelu=True, use_triton=True), quantize_rows_reference(x, gelu=True)
    torch.testing.assert_close(out.scale, ref.scale, rtol=1e-5, atol=0)
    assert (_bits(out) == _bits(ref)).float().mean() > 0.995  # x * sigmoid(2u) vs 0.5 x (1 + tanh u): fp32 ties
    assert (out.dequantize() - ref.dequantize()).abs().max() <= ref.scale.max() * 32


def test_fused_residual_quantization_matches_the_reference():
    gen = torch.Generator().manual_seed(6)
    x, y = (torch.randn(2, 2, 3, 4, 72, generator=gen) * 2).to(DEVICE).unbind(0)
    gate = torch.randn(2, 3, 1, 72, generator=gen).to(DEVICE)
    out, q = gated_add(x, gate, y, use_triton=True, quantize=True)
    ref_out, ref_q = gated_add(x, gate, y, use_triton=False, quantize=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert q.shape == (2, 3, 4) and q.data.shape == (24, 72)
    torch.testing.assert_close(q.scale, ref_q.scale, rtol=1e-5, atol=0)
    assert (_bits(q) == _bits(ref_q)).float().mean() > 0.995
    assert (q.dequantize() - ref_q.dequantize()).abs().max() <= ref_q.scale.max() * 32


def test_fused_norm_quantization_matches_the_reference():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 5, 72, generator=gen) * 3 + 1).to(DEVICE)
    shift, scale = (m.to(DEVICE) for m in torch.randn(2, 3, 2, 72, generator=gen)[:, :, None].unbind(3))
    out = modulated_norm(x, shift, scale, use_triton=True, quantize=True)
    ref = modulated_norm(x, shift, scale, use_triton=False, quantize=True)
    assert isinstance(out, Fp8Rows) and out.shape == (2, 3, 5) and out.data.shape == (30, 72)
    torch.testing.assert_close(out.scale, ref.scale, rtol=1e-5, atol=0)
    assert (_bits(out) == _bits(ref)).float().mean() > 0.995
    assert (out.dequantize() - ref.dequantize()).abs().max() <= ref.scale.max() * 32


def test_fp8_linear_is_the_scaled_product_of_its_quantized_operands():
    gen = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(192, 96).to(DEVICE)
    x = torch.randn(2, 16, 192, generator=gen).to(DEVICE)
    if DEVICE == "cuda":
        lin, x = lin.bfloat16(), x.bfloat16()
    f = Fp8Linear.from_linear(lin)
    y = f(x)
    assert y.shape == (2, 16, 96) and y.dtype == x.dtype
    q = quantize_rows_reference(x)
    w = f.weight.float() * f.weight_scale.t()
    emulated = q.dequantize() @ w.t() + lin.bias.float()
    tol = 1e-2 if DEVICE == "cuda" else 1e-5  # bf16 output on GPUs
    torch.testing.assert_close(y.float(), emulated, rtol=tol, atol=tol)
    # and close to the full-precision linear: e4m3 on both operands costs a few percent, not more
    full = lin(x).float()
    assert ((y.float() - full).norm() / full.norm()) < 0.06
    # the query slice of a fused projection
    torch.testing.assert_close(f(x, rows=slice(0, 32)), y[..., :32], rtol=0, atol=0)


def test_a_float8_model_stays_close_to_its_full_precision_self():
    from ca2vdm.server.model.loader import load_pipeline

    full = load_pipeline("random:tiny", device="cpu")
    fp8 = load_pipeline("random:tiny", device="cpu", precision="fp8")
    n = sum(isinstance(m, Fp8Linear) for m in fp8.model.modules())
    assert n == 8 * full.config.model.depth
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 16, 16, generator=gen)
    t, cond = torch.tensor([500, 20]), torch.zeros(2, 9)
    cond[:, :2] = 1
    with torch.no_grad():
        a, b = full.model(x, t, cond), fp8.model(x, t, cond)
    assert 0 < ((a - b).norm() / a.norm()) < 0.02


def test_unknown_precision_is_refused():
    from ca2vdm.server.model.loader import load_pipeline

    with pytest.raises(ValueError, match="precision"):
        load_pipeline("random:tiny", device="cpu", precision="int4")


@pytest.mark.skipif(DEVICE != "cuda", reason="cuBLASLt's GELU epilogue runs on GPUs only")
def test_the_gemm_gelu_epilogue_is_the_tanh_gelu():
    from ca2vdm.server.model.layers import Mlp

    mlp = Mlp(1152, 4608).cuda().bfloat16().eval()
    x = torch.randn(2, 256, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = mlp(x).float()
        plain = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh")).float()
        erf = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))).float()
    assert ((fused - plain).norm() / plain.norm()) < 4e-3
    assert ((fused - plain).norm()) < ((fused - erf).norm())
