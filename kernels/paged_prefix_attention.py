"""Paged prefix-enhanced spatial attention (Triton) and its plain torch reference.

Every token of a noisy chunk attends (per head) to all spatial tokens of its stream's last P conditional
frames (P = 3 in Ca2-VDM). Those frames' K/V live in a page pool, one page per frame, addressed by a
(B, P) table (entries may repeat: a one-frame write stores [f, f, f], which weights f three times exactly
as the reference's repeated keys do).

Shapes (one layer):
    q          : (B, N, H, D)  queries (N = T*S noisy tokens); any strides with a unit D stride
    pool       : (num_pages, 2, S, H, D) contiguous
    prefix     : (B, P) int32 page ids
    returns    : (B, N, H, D) in q's dtype, fp32 accumulation

A flash-attention tiling: one program owns BLOCK_M queries of one (stream, head) and streams the P*S keys
in BLOCK_N tiles straight out of the pages (no gather into a contiguous buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._align import common_alignment


@triton.jit
def _paged_prefix_attention_kernel(
    Q, Out, Pool, Prefix,
    stride_qb, stride_qn, stride_qh,
    stride_ob, stride_on, stride_oh,
    stride_pp, stride_pkv, stride_ps, stride_ph,
    stride_xb,
    num_queries, num_spatial, sm_scale,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, NUM_PREFIX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < num_queries
    d_mask = offs_d < HEAD_DIM

    q_off = tl.multiple_of(b * stride_qb + h * stride_qh + offs_m.to(tl.int64) * stride_qn, ALIGN)
    q_ptrs = Q + q_off[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(NUM_PREFIX):
        page = tl.load(Prefix + b * stride_xb + i).to(tl.int64)
        base = Pool + tl.multiple_of(page * stride_pp + h * stride_ph, ALIGN)
        for start in range(0, num_spatial, BLOCK_N):
            cols = start + offs_n
            c_mask = cols < num_spatial
            kv_mask = c_mask[:, None] & d_mask[None, :]
            k_ptrs = base + tl.multiple_of(cols * stride_ps, ALIGN)[:, None] + offs_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(k_ptrs + stride_pkv, mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(c_mask[None, :], qk * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    out = acc / l_i[:, None]
    o_off = tl.multiple_of(b * stride_ob + h * stride_oh + offs_m.to(tl.int64) * stride_on, ALIGN)
    o_ptrs = Out + o_off[:, None] + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefix_attention(
    q: Tensor, pool: Tensor, prefix: Tensor, out: Tensor | None = None, block_m: int = 64, num_warps: int = 4
) -> Tensor:
    """Attention of q over the K/V of each stream's prefix pages. See the module docstring."""
    b, n, h, d = q.shape
    assert pool.dim() == 5 and pool.shape[1] == 2 and pool.shape[3:] == (h, d), f"bad pool {tuple(pool.shape)}"
    assert pool.is_contiguous(), "pool must be contiguous"
    assert q.dtype == pool.dtype and q.stride(-1) == 1, "q must match the pool dtype, head_dim contiguous"
    assert prefix.dtype == torch.int32, "prefix table must be int32"
    assert prefix.dim() == 2 and prefix.shape[0] == b and prefix.stride(1) == 1, "prefix table must be (B, P)"
    s = pool.shape[2]
    if out is None:
        out = torch.empty((b, n, h, d), device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    grid = (triton.cdiv(n, block_m), h, b)
    _paged_prefix_attention_kernel[grid](
        q, out, pool, prefix,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3),
        prefix.stride(0),
        n, s, d**-0.5,
        HEAD_DIM=d, ALIGN=common_alignment([q, out, pool], [*q.stride()[:3], *out.stride()[:3], *pool.stride()[:4]]),
        NUM_PREFIX=prefix.shape[1], BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(d)),
        IEEE=q.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    return out


def gather_prefix_kv(pool: Tensor, prefix: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P*S, H, D) keys and values gathered into contiguous buffers."""
    pages = pool[prefix.long()]  # (B, P, 2, S, H, D)
    return pages[:, :, 0].flatten(1, 2), pages[:, :, 1].flatten(1, 2)


def paged_prefix_attention_sdpa(q: Tensor, pool: Tensor, prefix: Tensor) -> Tensor:
    """Gather the prefix pages into contiguous K/V, then torch SDPA (cuDNN / flash on GPUs).

    Measured faster than the Triton kernel for 4+ streams on an H100 (bench/results/paged_cache_h100.json):
    the P*S = 768 keys make this a compute-bound attention, where the vendor kernels' handling of
    head_dim 72 beats Triton's padding to 128, and the gather is a small copy (3 frames per stream).
    """
    k, v = gather_prefix_kv(pool, prefix)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def paged_prefix_attention_reference(q: Tensor, pool: Tensor, prefix: Tensor) -> Tensor:
    """Plain torch: gather the prefix pages, softmax attention in fp32."""
    k, v = gather_prefix_kv(pool, prefix)
    scores = q.float().transpose(1, 2) @ k.float().permute(0, 2, 3, 1) * q.shape[-1] ** -0.5  # (B, H, N, P*S)
    out = scores.softmax(-1) @ v.float().transpose(1, 2)  # (B, H, N, D)
    return out.transpose(1, 2).to(q.dtype)
