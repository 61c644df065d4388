"""Fused adaLN kernels against their torch references (interpreted on CPU, compiled on GPUs)."""

from __future__ import annotations

import pytest
import torch

from ca2vdm.kernels.adaln import gated_add, gated_add_reference, modulated_norm, modulated_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def modulation(gen, b, t, c, dtype):
    """(B, T, 1, C) views of a (B, T, 6, C) table, as the model's unbind of its modulation produces."""
    mod = torch.randn(b, t, 6, c, generator=gen).to(DEVICE, dtype)
    return mod[:, :, None].unbind(3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [72, 48])
def test_modulated_norm(dtype, c):
    gen = torch.Generator().manual_seed(c)
    x = (torch.randn(2, 3, 5, c, generator=gen) * 3 + 1).to(DEVICE, dtype)
    shift, scale, *_ = modulation(gen, 2, 3, c, dtype)
    out = modulated_norm(x, shift, scale, use_triton=True)
    ref = modulated_norm_reference(x.float(), shift.float(), scale.float())
    assert out.dtype == dtype and out.shape == x.shape and out.isfinite().all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_add(dtype):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 2, 3, 4, 40, generator=gen).to(DEVICE, dtype).unbind(0)
    *_, gate = modulation(gen, 2, 3, 40, dtype)
    out = gated_add(x, gate, y, use_triton=True)
    assert rel_err(out, gated_add_reference(x.float(), gate.float(), y.float())) < TOL[dtype]


def test_other_layouts_fall_back_to_the_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 16, generator=gen).to(DEVICE).transpose(1, 2)  # not a (B*T*S, C) row view
    gate = torch.randn(2, 3, 1, 16, generator=gen).to(DEVICE)
    y = torch.randn(2, 3, 4, 16, generator=gen).to(DEVICE)
    assert torch.equal(gated_add(x, gate, y, use_triton=True), gated_add_reference(x, gate, y))


def test_gradients_flow_when_training():
    """The kernels have no backward: with autograd recording they must not cut the graph (a model trained on
    a GPU through them silently got no gradient through any block's norms)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    shift, scale, _, _, _, gate = (m.detach().requires_grad_() for m in modulation(gen, 2, 3, 16, torch.float32))
    y = torch.randn(2, 3, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    out = gated_add(modulated_norm(x, shift, scale, use_triton=True), gate, y, use_triton=True)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, shift, scale, gate, y)]
    for t in (x, shift, scale, gate, y):
        t.grad = None
    ref = gated_add_reference(modulated_norm_reference(x, shift, scale), gate, y)
    ref.square().sum().backward()
    for got, t in zip(grads, (x, shift, scale, gate, y), strict=True):
        assert torch.allclose(got, t.grad, atol=1e-5)
