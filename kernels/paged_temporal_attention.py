"""Paged causal temporal attention (Triton) and its plain torch reference.

Ca2-VDM's temporal attention runs per spatial position: the T chunk frames at position s (one head at a
time) attend to every cached frame of their stream at s and, causally, to the chunk's own frames. The
cached frames live in a page pool, one page per frame, read through each stream's page table. Streams
in one batch may have any cache length 0..P_max; the order of pages in a table does not matter (all
cached frames are visible to all queries and positions are already inside the K/V).

Shapes (one layer):
    q, k_new, v_new : (B, S, T, H, D)     chunk queries and K/V; any strides with a unit D stride
    pool            : (num_pages, 2, S, H, D)   [:, 0] keys, [:, 1] values; contiguous
    page_table      : (B, max_pages) int32 page ids; row b's first `cache_lens[b]` entries are valid
    cache_lens      : (B,) int32
    returns         : (B, S, T, H, D) in q's dtype, fp32 accumulation

Each program owns one (stream, spatial position, head) problem: a (T x D) query tile against at most
P_max + T keys, all in registers at once (P_max <= 64), so the program is straight-line code that issues
every load before its first use. The problems are tiny, so the kernel is bound by reading K/V; the grid
puts the head on the fastest axis so neighbouring programs read neighbouring bytes of the same pages,
and one warp per program keeps the most programs (and loads) in flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._align import common_alignment


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _paged_temporal_attention_kernel(
    Q, K_new, V_new, Out, Pool, Table, Lens,
    stride_qb, stride_qs, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kt, stride_kh,
    stride_vb, stride_vs, stride_vt, stride_vh,
    stride_ob, stride_os, stride_ot, stride_oh,
    stride_pp, stride_pkv, stride_ps, stride_ph,
    stride_tb,
    num_frames, sm_scale,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # head_dim is split into a power-of-two part [0, D_LO) and a remainder [D_LO, HEAD_DIM) padded to D_HI
    # (72 = 64 + 8 -> tiles of 64 + 16 columns instead of 128: fewer registers and wasted lanes)
    h = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    lo = tl.arange(0, D_LO)
    hi = D_LO + tl.arange(0, D_HI)
    hi_ok = hi < HEAD_DIM
    m_mask = offs_m < num_frames

    # 1. issue every load up front (straight-line code: the page loads wait only on the table load)
    q_rows = Q + tl.multiple_of(b * stride_qb + s * stride_qs + h * stride_qh, ALIGN) + offs_m[:, None] * stride_qt
    k_rows = K_new + tl.multiple_of(b * stride_kb + s * stride_ks + h * stride_kh, ALIGN) + offs_m[:, None] * stride_kt
    v_rows = V_new + tl.multiple_of(b * stride_vb + s * stride_vs + h * stride_vh, ALIGN) + offs_m[:, None] * stride_vt
    q_lo = tl.load(q_rows + lo[None, :], mask=m_mask[:, None], other=0.0)
    q_hi = tl.load(q_rows + hi[None, :], mask=m_mask[:, None] & hi_ok[None, :], other=0.0)
    kn_lo = tl.load(k_rows + lo[None, :], mask=m_mask[:, None], other=0.0)
    kn_hi = tl.load(k_rows + hi[None, :], mask=m_mask[:, None] & hi_ok[None, :], other=0.0)
    vn_lo = tl.load(v_rows + lo[None, :], mask=m_mask[:, None], other=0.0)
    vn_hi = tl.load(v_rows + hi[None, :], mask=m_mask[:, None] & hi_ok[None, :], other=0.0)
    num_cached = tl.load(Lens + b)
    c_mask = offs_n < num_cached
    pages = tl.load(Table + b * stride_tb + offs_n, mask=c_mask, other=0).to(tl.int64)
    rows = Pool + tl.multiple_of(pages * stride_pp + s * stride_ps + h * stride_ph, ALIGN)[:, None]  # (BLOCK_N, 1)
    kc_lo = tl.load(rows + lo[None, :], mask=c_mask[:, None], other=0.0)
    kc_hi = tl.load(rows + hi[None, :], mask=c_mask[:, None] & hi_ok[None, :], other=0.0)
    vc_lo = tl.load(rows + stride_pkv + lo[None, :], mask=c_mask[:, None], other=0.0)
    vc_hi = tl.load(rows + stride_pkv + hi[None, :], mask=c_mask[:, None] & hi_ok[None, :], other=0.0)

    # 2. scores against the cached frames (all visible) and the chunk's frames (causal: j <= i)
    s_cached = _dot(q_lo, tl.trans(kc_lo), IEEE) + _dot(q_hi, tl.trans(kc_hi), IEEE)
    s_chunk = _dot(q_lo, tl.trans(kn_lo), IEEE) + _dot(q_hi, tl.trans(kn_hi), IEEE)
    s_cached = tl.where(c_mask[None, :], s_cached * sm_scale, float("-inf"))
    visible = (offs_m[None, :] <= offs_m[:, None]) & m_mask[None, :]
    s_chunk = tl.where(visible, s_chunk * sm_scale, float("-inf"))

    # 3. softmax over both key sets (each row sees at least its own frame, so the max is finite)
    row_max = tl.maximum(tl.max(s_cached, 1), tl.max(s_chunk, 1))
    p_cached = tl.exp(s_cached - row_max[:, None])
    p_chunk = tl.exp(s_chunk - row_max[:, None])
    inv_l = 1.0 / (tl.sum(p_cached, 1) + tl.sum(p_chunk, 1))
    pc = p_cached.to(vc_lo.dtype)
    pn = p_chunk.to(vn_lo.dtype)
    out_lo = (_dot(pc, vc_lo, IEEE) + _dot(pn, vn_lo, IEEE)) * inv_l[:, None]
    out_hi = (_dot(pc, vc_hi, IEEE) + _dot(pn, vn_hi, IEEE)) * inv_l[:, None]

    o_rows = Out + tl.multiple_of(b * stride_ob + s * stride_os + h * stride_oh, ALIGN) + offs_m[:, None] * stride_ot
    tl.store(o_rows + lo[None, :], out_lo.to(Out.dtype.element_ty), mask=m_mask[:, None])
    tl.store(o_rows + hi[None, :], out_hi.to(Out.dtype.element_ty), mask=m_mask[:, None] & hi_ok[None, :])


def _split_head_dim(d: int) -> tuple[int, int]:
    """(D_LO, D_HI): the largest power of two <= d (>= 16), and the rest padded to a power of two >= 16."""
    lo = max(16, 1 << (d.bit_length() - 1))
    rest = d - lo
    return lo, max(16, triton.next_power_of_2(rest)) if rest > 0 else 16


def _block(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def paged_temporal_attention(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    pool: Tensor,
    page_table: Tensor,
    cache_lens: Tensor,
    out: Tensor | None = None,
    num_warps: int = 1,
) -> Tensor:
    """Causal temporal attention of a chunk over [paged cached frames | the chunk]. See the module docstring."""
    b, s, t, h, d = q.shape
    assert k_new.shape == q.shape and v_new.shape == q.shape, "q, k_new, v_new must have the same shape"
    assert pool.dim() == 5 and pool.shape[1:] == (2, s, h, d), f"pool {tuple(pool.shape)} != (N, 2, {s}, {h}, {d})"
    assert pool.is_contiguous(), "pool must be contiguous"
    assert q.dtype == k_new.dtype == v_new.dtype == pool.dtype, "all inputs must share one dtype"
    assert q.stride(-1) == 1 and k_new.stride(-1) == 1 and v_new.stride(-1) == 1, "head_dim must be contiguous"
    assert page_table.dtype == torch.int32, "page_table must be int32"
    assert page_table.shape[0] == b and page_table.stride(1) == 1, "page_table must be (B, max_pages), unit stride"
    assert cache_lens.dtype == torch.int32 and cache_lens.shape == (b,), "cache_lens must be (B,) int32"
    assert t <= 64 and page_table.shape[1] <= 64, "chunks and caches longer than 64 frames are not supported"
    if out is None:
        out = torch.empty((b, s, t, h, d), device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    assert d >= 16, "head_dim must be >= 16"
    d_lo, d_hi = _split_head_dim(d)
    strides = [*q.stride()[:4], *k_new.stride()[:4], *v_new.stride()[:4], *out.stride()[:4], *pool.stride()[:4]]
    align = common_alignment([q, k_new, v_new, out, pool], strides)
    grid = (h, s, b)
    _paged_temporal_attention_kernel[grid](
        q, k_new, v_new, out, pool, page_table, cache_lens,
        *q.stride()[:4], *k_new.stride()[:4], *v_new.stride()[:4], *out.stride()[:4],
        *pool.stride()[:4], page_table.stride(0),
        t, d**-0.5,
        HEAD_DIM=d, D_LO=d_lo, D_HI=d_hi, ALIGN=align,
        BLOCK_M=_block(t), BLOCK_N=_block(page_table.shape[1]), IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def paged_temporal_attention_reference(
    q: Tensor, k_new: Tensor, v_new: Tensor, pool: Tensor, page_table: Tensor, cache_lens: Tensor
) -> Tensor:
    """Plain torch: gather each stream's pages, concatenate the chunk, masked softmax in fp32."""
    b, s, t, h, d = q.shape
    outs = []
    for i in range(b):
        n = int(cache_lens[i])
        pages = pool[page_table[i, :n].long()]  # (n, 2, S, H, D)
        keys = torch.cat([pages[:, 0].permute(1, 2, 0, 3), k_new[i].permute(0, 2, 1, 3)], dim=2)  # (S, H, n+T, D)
        vals = torch.cat([pages[:, 1].permute(1, 2, 0, 3), v_new[i].permute(0, 2, 1, 3)], dim=2)
        qi = q[i].permute(0, 2, 1, 3).float()  # (S, H, T, D)
        scores = qi @ keys.float().transpose(-1, -2) * d**-0.5  # (S, H, T, n+T)
        visible = torch.arange(n + t, device=q.device)[None, :] <= torch.arange(t, device=q.device)[:, None] + n
        scores = scores.masked_fill(~visible, float("-inf"))
        out = scores.softmax(-1) @ vals.float()  # (S, H, T, D)
        outs.append(out.permute(0, 2, 1, 3).to(q.dtype))
    return torch.stack(outs)
