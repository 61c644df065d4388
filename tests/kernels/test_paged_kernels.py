"""Each paged kernel against its torch reference: random page tables (shuffled, shared between streams),
cache lengths 0 / 1 / partial / full, strided inputs, random data, poisoned outputs.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at small
shapes; on a GPU the same tests run the compiled kernels, plus the XL/2 shapes.
"""

from __future__ import annotations

import pytest
import torch

from ca2vdm.kernels.paged_prefix_attention import (
    paged_prefix_attention,
    paged_prefix_attention_reference,
    paged_prefix_attention_sdpa,
)
from ca2vdm.kernels.paged_temporal_attention import paged_temporal_attention, paged_temporal_attention_reference
from ca2vdm.kernels.paged_write import paged_write, paged_write_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter has no bfloat16 arithmetic; bf16 runs on GPUs only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def page_table(gen, num_streams, max_frames, num_pages, share_first=True):
    """Random distinct page ids per stream; streams share their first page (a shared first frame)."""
    table = torch.stack([torch.randperm(num_pages, generator=gen)[:max_frames] for _ in range(num_streams)])
    if share_first:
        table[:, 0] = table[0, 0]
    return table.int()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, t", [(72, 8), (16, 8), (16, 25)])  # t=25: a resumed stream's rebuild write
def test_paged_temporal_attention(dtype, head_dim, t):
    gen = torch.Generator().manual_seed(head_dim)
    b, s, h, max_frames, num_pages = 4, 3, 2, 25, 64
    pool = torch.randn(num_pages, 2, s, h, head_dim, generator=gen).to(DEVICE, dtype)
    # q, k, v as strided views of one qkv projection, as the model produces them
    q, k, v = torch.randn(b, s, t, 3, h, head_dim, generator=gen).to(DEVICE, dtype).unbind(3)
    table = page_table(gen, b, max_frames, num_pages).to(DEVICE)
    lens = torch.tensor([0, 1, 13, max_frames], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_temporal_attention(q, k, v, pool, table, lens, out=out)
    ref = paged_temporal_attention_reference(q, k, v, pool, table, lens)
    assert not out.isnan().any(), "unwritten output elements"
    assert rel_err(out, ref) < TOL[dtype]


def test_paged_temporal_attention_ignores_pages_past_length():
    """Entries of the table beyond cache_lens are garbage ids and must never be read."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(10, 2, 2, 1, 16, generator=gen).to(DEVICE)
    q, k, v = torch.randn(3, 1, 2, 5, 1, 16, generator=gen).to(DEVICE).unbind(0)
    table = torch.tensor([[3, 7, 10**6, -5]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    out = paged_temporal_attention(q, k, v, pool, table, lens)
    ref = paged_temporal_attention_reference(q, k, v, pool, table[:, :2].contiguous(), lens)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [72, 32])
def test_paged_prefix_attention(dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim + 1)
    b, s, t, h, num_pages = 3, 16, 5, 2, 20
    pool = torch.randn(num_pages, 2, s, h, head_dim, generator=gen).to(DEVICE, dtype)
    q = torch.randn(b, t * s, 3, h, head_dim, generator=gen).to(DEVICE, dtype)[:, :, 0]  # strided view
    # a one-frame write repeats its page; streams may share pages
    prefix = torch.tensor([[4, 4, 4], [1, 9, 17], [9, 2, 4]], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_prefix_attention(q, pool, prefix, out=out)
    ref = paged_prefix_attention_reference(q, pool, prefix)
    assert not out.isnan().any(), "unwritten output elements"
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(paged_prefix_attention_sdpa(q, pool, prefix), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", [8, 25])
def test_paged_write(dtype, f):
    gen = torch.Generator().manual_seed(2)
    b, s, h, d, num_pages = 3, 4, 2, 72, 80
    # k/v as (B, F, S, H, D) views of a (B, S, F, 3, H, D) projection: the layout the model stores
    _, k, v = torch.randn(b, s, f, 3, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2).unbind(3)
    pages = torch.randperm(num_pages, generator=gen)[: b * f].view(b, f).int().to(DEVICE)
    pool = torch.full((num_pages, 2, s, h, d), float("nan"), device=DEVICE, dtype=dtype)
    expected = pool.clone()
    paged_write(k, v, pool, pages)
    paged_write_reference(k, v, expected, pages)
    assert torch.equal(pool.nan_to_num(7.0), expected.nan_to_num(7.0))  # written pages exact, others untouched
    assert pool[pages.long()].isfinite().all()


def test_kernels_reject_bad_inputs():
    pool = torch.randn(4, 2, 2, 1, 16, device=DEVICE)
    q = torch.randn(1, 2, 3, 1, 16, device=DEVICE)
    lens = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="int32"):
        paged_temporal_attention(q, q, q, pool, torch.zeros(1, 4, dtype=torch.int64, device=DEVICE), lens)
    with pytest.raises(AssertionError, match="pool"):
        paged_temporal_attention(q, q, q, pool[:, :, :1], torch.zeros(1, 4, dtype=torch.int32, device=DEVICE), lens)
    with pytest.raises(AssertionError, match="dtype"):
        paged_temporal_attention(q.half(), q.half(), q.half(), pool, torch.zeros(1, 4, dtype=torch.int32,
                                 device=DEVICE), lens)  # fmt: skip
