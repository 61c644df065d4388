"""Paged write (Triton): scatter the K/V of finished frames into their newly allocated pages.

Shapes (one layer):
    k, v   : (B, F, S, H, D)   any strides with a unit D stride (typically views of a qkv projection)
    pool   : (num_pages, 2, S, H, D) contiguous; frame f of stream b goes to pool[pages[b, f]]
    pages  : (B, F) int32, distinct ids (a page is written once and is immutable afterwards)

One program copies one (frame, spatial position): H*D keys and H*D values, as contiguous rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._align import common_alignment


@triton.jit
def _paged_write_kernel(
    K, V, Pool, Pages,
    stride_kb, stride_kf, stride_ks,
    stride_vb, stride_vf, stride_vs,
    stride_pp, stride_pkv, stride_ps,
    stride_gb,
    num_frames,
    ROW: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    bf = tl.program_id(1)
    b = (bf // num_frames).to(tl.int64)
    f = bf % num_frames
    page = tl.load(Pages + b * stride_gb + f).to(tl.int64)
    k_off = tl.multiple_of(b * stride_kb + f * stride_kf + s * stride_ks, ALIGN)
    v_off = tl.multiple_of(b * stride_vb + f * stride_vf + s * stride_vs, ALIGN)
    dst_off = tl.multiple_of(page * stride_pp + s * stride_ps, ALIGN)
    for start in tl.static_range(0, ROW, BLOCK):  # one row = the H*D values of one token, contiguous
        offs = start + tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(K + k_off + offs, mask=mask)
        v = tl.load(V + v_off + offs, mask=mask)
        tl.store(Pool + dst_off + offs, k, mask=mask)
        tl.store(Pool + dst_off + stride_pkv + offs, v, mask=mask)


def paged_write(k: Tensor, v: Tensor, pool: Tensor, pages: Tensor) -> None:
    """pool[pages[b, f], 0] = k[b, f]; pool[pages[b, f], 1] = v[b, f]."""
    b, f, s, h, d = k.shape
    assert v.shape == k.shape, "k and v must have the same shape"
    assert pool.dim() == 5 and pool.shape[1:] == (2, s, h, d), f"pool {tuple(pool.shape)} != (N, 2, {s}, {h}, {d})"
    assert pool.is_contiguous(), "pool must be contiguous"
    assert k.dtype == v.dtype == pool.dtype, "k, v and pool must share one dtype"
    assert pages.dtype == torch.int32 and pages.shape == (b, f) and pages.stride(1) == 1, "pages must be (B, F) int32"
    if b * f == 0:
        return
    # each token's H*D values must be one contiguous row (true for views of a qkv projection)
    k = k if k.stride(-1) == 1 and k.stride(-2) == d else k.contiguous()
    v = v if v.stride(-1) == 1 and v.stride(-2) == d else v.contiguous()
    row = h * d
    _paged_write_kernel[(s, b * f)](
        k, v, pool, pages,
        *k.stride()[:3], *v.stride()[:3], pool.stride(0), pool.stride(1), pool.stride(2), pages.stride(0),
        f,
        ROW=row, ALIGN=common_alignment([k, v, pool], [*k.stride()[:3], *v.stride()[:3], *pool.stride()[:3]]),
        BLOCK=min(1024, triton.next_power_of_2(row)), num_warps=4,
    )  # fmt: skip


def paged_write_reference(k: Tensor, v: Tensor, pool: Tensor, pages: Tensor) -> None:
    ids = pages.reshape(-1).long()
    pool[ids, 0] = k.reshape(-1, *k.shape[2:])
    pool[ids, 1] = v.reshape(-1, *v.shape[2:])
