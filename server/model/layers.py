"""Building blocks of CausalSTDiT2: embeddings, attention projections, MLP, final layer.

Module and parameter names (`qkv`, `proj`, `fc1`, `mlp.0`, `y_proj`, ...) are those of the reference
implementation, so official state dicts load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ca2vdm.kernels.fp8 import Fp8Linear, Fp8Rows, quantize_rows

# ---------------------------------------------------------------------------------------------------------
# Fixed sin-cos position embeddings (computed in float64, stored as float32 buffers)
# ---------------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) embedding: [sin(p * w_i) | cos(p * w_i)], w_i = 10000^(-2i/dim)."""
    assert dim % 2 == 0, "embedding dim must be even"
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1, 1) * freqs[None]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def spatial_pos_embed(dim: int, grid: tuple[int, int], scale: float = 1.0) -> Tensor:
    """(1, h*w, dim): first half encodes the column (x) index, second half the row (y) index."""
    h, w = grid
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) / scale,
        torch.arange(w, dtype=torch.float64) / scale,
        indexing="ij",
    )
    emb = torch.cat([sincos_1d(dim // 2, xs.reshape(-1)), sincos_1d(dim // 2, ys.reshape(-1))], dim=1)
    return emb.float().unsqueeze(0)


def temporal_pos_embed(dim: int, length: int, scale: float = 1.0) -> Tensor:
    """(1, length, dim) table indexed cyclically by absolute frame position."""
    return sincos_1d(dim, torch.arange(length, dtype=torch.float64) / scale).float().unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------------


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) -> (B, T*h*w, D) tokens, frame-major."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # contiguous: otherwise the whole residual stream inherits the conv's channels-first layout, and
        # every elementwise op and linear after it runs strided (measured: ~40% of an XL/2 forward)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Diffusion timesteps of any shape (...,) -> (..., D) via 256 sinusoidal features and an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[..., None] * freqs  # (..., half)
        feats = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(feats.to(dtype))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor | Fp8Rows) -> Tensor:
        if isinstance(self.fc1, Fp8Linear):  # GELU fused into the quantization of fc2's input
            return self.fc2(quantize_rows(self.fc1(x), gelu=True))
        assert isinstance(x, Tensor)
        if _gelu_epilogue(x, self.fc1):  # GELU in the GEMM's epilogue: one pass fewer over the widest tensor
            w = self.fc1.weight
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, w.shape[1]), w.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], -1))
        return self.fc2(self.act(self.fc1(x)))


GELU_EPILOGUE = True  # benchmarks turn it off to time the plain path, or to count its FLOPs


def _gelu_epilogue(x: Tensor, fc: nn.Linear) -> bool:
    """cuBLASLt's GELU epilogue is the tanh approximation this MLP uses (tests/kernels/test_fp8.py checks it on
    GPUs); on the CPU `_addmm_activation` computes the erf GELU, and autograd and autocast (training) take the
    plain path."""
    return (
        GELU_EPILOGUE
        and x.is_cuda
        and fc.bias is not None
        and x.dtype == fc.weight.dtype
        and not torch.is_autocast_enabled("cuda")
        and not (torch.is_grad_enabled() and (x.requires_grad or fc.weight.requires_grad))
    )


class CaptionEmbedder(nn.Module):
    """Projects caption features (B, N_tok, C_cap) to the hidden size. `y_embedding` is the null caption."""

    def __init__(self, caption_channels: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, dim)
        self.register_buffer("y_embedding", torch.randn(num_tokens, caption_channels) / caption_channels**0.5)

    def forward(self, y: Tensor) -> Tensor:
        return self.y_proj(y)


# ---------------------------------------------------------------------------------------------------------
# Attention projections (the attention itself is computed by the caller, which knows the key set)
# ---------------------------------------------------------------------------------------------------------


class AttentionProj(nn.Module):
    """The `qkv` and `proj` linears of one attention; heads are contiguous (H, D) slices of each third."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split_qkv(self, x: Tensor | Fp8Rows) -> tuple[Tensor, Tensor, Tensor]:
        """(..., C) -> q, k, v each (..., H, D)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return q, k, v

    def query(self, x: Tensor) -> Tensor:
        """Only the query third of `qkv`: (..., C) -> (..., H, D). Saves 2/3 of the projection."""
        dim = self.num_heads * self.head_dim
        if isinstance(self.qkv, Fp8Linear):
            q = self.qkv(x, rows=slice(0, dim))
        else:
            q = F.linear(x, self.qkv.weight[:dim], self.qkv.bias[:dim])
        return q.unflatten(-1, (self.num_heads, self.head_dim))

    def self_attention(self, x: Tensor | Fp8Rows) -> Tensor:
        """Full self-attention over the second-to-last axis: (..., L, C) -> (..., L, C)."""
        q, k, v = self.split_qkv(x)  # (..., L, H, D)
        out = attention(*(z.flatten(0, -4) for z in (q, k, v)))  # (N, L, H*D)
        return self.proj(out.view(*q.shape[:-2], -1))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """q (N, Lq, H, D), k/v (N, Lk, H, D), boolean mask broadcastable to (N, H, Lq, Lk) (True = attend), or
    `causal` (query i sees keys <= i; no mask tensor, so a flash kernel can run it).

    Returns (N, Lq, H*D). Softmax scale 1/sqrt(D).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).flatten(2)


def take(x: Tensor, idx: list[int], dim: int) -> Tensor:
    """`x.index_select(dim, idx)` for a Python list, without a host-to-device copy of the index (a stream sync,
    and not allowed inside a CUDA graph capture): a view for a consecutive range, else one-slice views joined."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return x.narrow(dim, idx[0], len(idx))
    return torch.cat([x.narrow(dim, i, 1) for i in idx], dim=dim)


def chunk_causal_mask(num_cached: int, num_chunk: int, device: torch.device) -> Tensor:
    """(T, L + T) boolean: every chunk frame sees all L cached frames and the chunk frames up to itself."""
    cols = torch.arange(num_cached + num_chunk, device=device)
    rows = torch.arange(num_chunk, device=device) + num_cached
    return cols[None, :] <= rows[:, None]


class CrossAttention(nn.Module):
    """Tokens attend to their own sample's caption tokens (optionally masked)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, y_mask: Tensor | None) -> Tensor:
        """x (B, N, C), y (B, N_tok, C), y_mask (B, N_tok) with 1 for real tokens."""
        q = self.q_linear(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, N, H, D)
        k, v = self.kv_linear(y).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(-3)
        mask = None if y_mask is None else y_mask.bool()[:, None, None, :]  # (B, 1, 1, N_tok)
        return self.proj(attention(q, k, v, mask))


class FinalLayer(nn.Module):
    """Per-frame adaLN (shift, scale from each frame's timestep embedding) then a linear to patch pixels."""

    def __init__(self, dim: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        """x (B, T, S, C), t_emb (B, T, C) -> (B, T, S, patch_volume * out_channels)."""
        shift, scale = (self.scale_shift_table[None, None] + t_emb[:, :, None]).unbind(2)  # (B, T, C) each
        x = self.norm_final(x) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.linear(x)
