"""CausalSTDiT2: the spatio-temporal DiT of Ca2-VDM with causal temporal attention and a shared K/V cache.

One network, three ways to run it:
- `forward`  — recompute: one pass over [conditional frames | noisy frames] with per-frame timesteps and a
               causal temporal mask (training, and what a model without a cache runs every step);
- `write`    — one t=0 pass over a finished, clean chunk that appends its K/V to a `KVCache`;
- `denoise`  — a pass over a noisy chunk that reads the cache and recomputes nothing of the past.

Tensors inside a block are (B, T, S, C): batch, frames, spatial tokens per frame, channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ca2vdm.kernels.adaln import gated_add, modulated_norm
from ca2vdm.kernels.fp8 import Fp8Linear, Fp8Rows

from .cache import KVCache
from .config import ModelConfig
from .layers import (
    AttentionProj,
    CaptionEmbedder,
    CrossAttention,
    FinalLayer,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    attention,
    spatial_pos_embed,
    take,
    temporal_pos_embed,
)


def prefix_frame_indices(num_frames: int, num_prefix: int) -> list[int]:
    """Which frames of a written chunk become the prefix K/V (the reference's rule).

    The last `num_prefix` frames; a chunk shorter than that repeats each frame (e.g. T=1 -> [0, 0, 0],
    T=2 -> [0, 0, 1]), so the key multiset matches the recompute path's clamped look-back.
    """
    if num_frames >= num_prefix:
        return list(range(num_frames - num_prefix, num_frames))
    repeat = num_prefix // num_frames + 1
    return [i // repeat for i in range(num_prefix)]


@dataclass
class _Pass:
    """What every block of one forward needs besides x and its modulation."""

    mode: str  # "full" | "write" | "denoise"
    tpe: Tensor  # (B, T, C) temporal position embedding, added at block 0
    mask_channel: Tensor  # (B, T) 1.0 on conditional frames
    cache: KVCache | None = None
    y: Tensor | None = None  # (B, N_tok, C) embedded captions
    y_mask: Tensor | None = None  # (B, N_tok)
    temporal_mask: Tensor | None = None  # full mode: (T, T) boolean, True = attend; None: causal
    prefix_index: Tensor | None = None  # full mode: (B, P) frame indices of each sample's prefix frames


# buffers a new model draws at random (checkpoints hold them), N(0, 1/channels): name -> the channel dimension
RANDOM_BUFFERS = {"bov_token": 0, "y_embedding": -1}


class CausalSTDiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        dim, heads = cfg.hidden_size, cfg.num_heads
        self.index = index
        self.attn = AttentionProj(dim, heads)
        self.cross_attn = CrossAttention(dim, heads) if cfg.caption_channels > 0 else None
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn_temp = AttentionProj(dim, heads)
        self.attn_cf = AttentionProj(dim, heads) if cfg.prefix_frames > 0 else None
        self.num_prefix = cfg.prefix_frames
        extra = cfg.temp_extra_in_channels if index == 0 else 0
        self.attn_temp_pre_merge = nn.Linear(dim + extra, dim) if extra > 0 else None

    def forward(self, x: Tensor, t_mlp: Tensor, p: _Pass, *, is_last: bool = False) -> Tensor:
        b, t, s, c = x.shape
        mod = self.scale_shift_table + t_mlp.unflatten(-1, (6, c))  # (B, T, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, None].unbind(3)  # (B,T,1,C)

        # With float8 linears, the kernel that produces a linear's input also writes it quantized (`xq`, `h`).
        fp8 = isinstance(self.attn.qkv, Fp8Linear)

        # 1. spatial self-attention within each frame
        h = modulated_norm(x, shift_msa, scale_msa, quantize=fp8)
        next_reads_x = self.attn_cf is not None or self.index > 0  # prefix query, or temporal qkv
        x, xq = self._residual(x, gate_msa, self.attn.self_attention(h), quantize=fp8 and next_reads_x)

        # 2. prefix-enhanced spatial attention (reads the un-normalised residual stream)
        prefix_kv = None
        if self.attn_cf is not None:
            out, prefix_kv = self._prefix_attention(x, p, xq)
            x, xq = self._residual(x, gate_msa, self.attn_cf.proj(out), quantize=fp8 and self.index > 0)

        # 3. causal temporal attention per spatial position. Projections are per token, so they run in the
        #    (B, T, S, C) layout; only the attention sees (B, S, T, ...) views, and no tensor is transposed.
        h = x if xq is None else xq
        if self.index == 0:
            h = x + p.tpe[:, :, None]
            if self.attn_temp_pre_merge is not None:
                mask = p.mask_channel.to(h.dtype)[:, :, None, None].expand(b, t, s, 1)
                h = self.attn_temp_pre_merge(torch.cat([h, mask], dim=-1))
        q, k, v = (z.transpose(1, 2) for z in self.attn_temp.split_qkv(h))  # (B, S, T, H, D) views
        if p.mode == "full":
            qf, kf, vf = (z.reshape(b * s, t, *z.shape[-2:]) for z in (q, k, v))
            out = attention(qf, kf, vf, p.temporal_mask, causal=p.temporal_mask is None).view(b, s, t, c)
        else:
            assert p.cache is not None
            out = p.cache.attend_temporal(self.index, q, k, v)
            if p.mode == "write":
                pk, pv = prefix_kv if prefix_kv is not None else (None, None)
                p.cache.store(self.index, k, v, pk, pv)
                if is_last:  # nothing after this point feeds the cache
                    return x
        x = gated_add(x, gate_msa, self.attn_temp.proj(out.transpose(1, 2)))

        # 4. cross-attention to captions
        if self.cross_attn is not None:
            assert p.y is not None, "this model needs caption embeddings"
            x = x + self.cross_attn(x.flatten(1, 2), p.y, p.y_mask).view(b, t, s, c)

        # 5. MLP
        h = modulated_norm(x, shift_mlp, scale_mlp, quantize=fp8)
        return gated_add(x, gate_mlp, self.mlp(h))

    @staticmethod
    def _residual(x: Tensor, gate: Tensor, y: Tensor, quantize: bool) -> tuple[Tensor, Fp8Rows | None]:
        """x + gate * y, and (if `quantize`) the same as e4m3 rows for the float8 linear that reads it next."""
        if quantize:
            return gated_add(x, gate, y, quantize=True)  # type: ignore[return-value]
        return gated_add(x, gate, y), None  # type: ignore[return-value]

    def _prefix_attention(
        self, x: Tensor, p: _Pass, xq: Fp8Rows | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Returns the attention output (B, T, S, C) and, when writing, the prefix K/V to cache. `xq`: x as
        e4m3 rows, when the projections are float8.

        Conditional frames attend to their own tokens (the reference attends to them repeated N times,
        which is the same softmax); noisy frames attend to the last N conditional frames.
        """
        assert self.attn_cf is not None
        b, t, s, c = x.shape
        if p.mode == "denoise":  # queries only; keys and values come from the cache
            assert p.cache is not None
            q = self.attn_cf.query(x if xq is None else xq).flatten(1, 2)  # (B, T*S, H, D)
            return p.cache.attend_prefix(self.index, q).view(b, t, s, c), None

        q, k, v = self.attn_cf.split_qkv(x if xq is None else xq)  # (B, T, S, H, D)
        own = attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).view(b, t, s, c)
        if p.mode == "write":
            idx = prefix_frame_indices(t, self.num_prefix)
            return own, (take(k, idx, 1), take(v, idx, 1))  # the write runs inside a CUDA graph

        assert p.prefix_index is not None
        rows = torch.arange(b, device=x.device)[:, None]
        pk = k[rows, p.prefix_index].flatten(1, 2)  # (B, P*S, H, D)
        pv = v[rows, p.prefix_index].flatten(1, 2)
        from_prefix = attention(q.flatten(1, 2), pk, pv).view(b, t, s, c)
        is_cond = p.mask_channel.bool()[:, :, None, None]
        return torch.where(is_cond, own, from_prefix), None


def _full_precision(x: Tensor) -> torch.autocast:
    """Suspend autocast (if any) on x's device type."""
    return torch.autocast(x.device.type, enabled=False)


class CausalSTDiT(nn.Module):
    """CausalSTDiT2 with the reference's parameter and buffer names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.register_buffer("pos_embed", spatial_pos_embed(dim, cfg.grid_size, cfg.space_scale))
        self.register_buffer("pos_embed_temporal", temporal_pos_embed(dim, cfg.max_tpe_len, cfg.time_scale))
        # <BOV> frame: the cache prefix when a video is generated without a first frame.
        h, w = cfg.input_size[1:]
        self.register_buffer("bov_token", torch.randn(cfg.in_channels, h, w) / cfg.in_channels**0.5)
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = (
            CaptionEmbedder(cfg.caption_channels, dim, cfg.model_max_length) if cfg.caption_channels > 0 else None
        )
        self.blocks = nn.ModuleList([CausalSTDiTBlock(cfg, i) for i in range(cfg.depth)])
        self.final_layer = FinalLayer(dim, cfg.patch_size[1] * cfg.patch_size[2], cfg.out_channels)

    # ---- public entry points ---------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond_mask: Tensor,
        *,
        tpe_start: Tensor | int = 0,
        temporal_mask: Tensor | None = None,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
    ) -> Tensor:
        """Recompute pass. x (B, C, T, H, W); t (B, T) or (B,); cond_mask (B, T) (or the reference's
        (B, 1, T, 1, 1)) with 1 on the conditional frames, which come first. `temporal_mask` (T, T)
        overrides the causal mask (True = attend). `tpe_start` offsets the cyclic temporal positions (an int, or
        a (B,) tensor: one offset per sample). Returns (B, 2C, T, H, W) float32: epsilon | variance.
        """
        b, _, t_len = x.shape[:3]
        cond = cond_mask.reshape(b, t_len).to(torch.float32)
        t = t.reshape(b, -1).expand(b, t_len) if t.dim() == 2 else t[:, None].expand(b, t_len)
        prefix_index = None
        if self.config.prefix_frames > 0:
            cond_len = cond.sum(dim=1).long()  # (B,)
            # Bound check: on a GPU a device-side assert, since a host sync every training step would stop the
            # CPU from queueing the next kernels while the GPU works.
            message = "every sample needs at least one conditional frame for prefix attention"
            if cond_len.is_cuda:
                torch._assert_async((cond_len >= 1).all(), message)
            elif bool((cond_len < 1).any()):
                raise ValueError(message)
            back = torch.arange(self.config.prefix_frames, device=x.device)
            prefix_index = (cond_len[:, None] - 1 - back).clamp(min=0)  # (B, P)
        p = _Pass(
            mode="full",
            tpe=self._tpe(tpe_start, b, t_len, x.device),
            mask_channel=cond,
            temporal_mask=temporal_mask,
            prefix_index=prefix_index,
        )
        return self._run(x, t, p, y, y_mask)

    @torch.no_grad()
    def write(self, cache: KVCache, clean: Tensor, y: Tensor | None = None, y_mask: Tensor | None = None) -> None:
        """Append a clean chunk (B, C, T, H, W) to the cache: begin the write (the cache may refuse it, changing
        nothing), run `write_kv`, commit; a forward that raises aborts the write."""
        cache.begin_write(clean.shape[2])
        try:
            self.write_kv(cache, clean, y, y_mask)
        except BaseException:
            cache.abort_write()
            raise
        cache.commit_write()

    @torch.no_grad()
    def write_kv(self, cache: KVCache, clean: Tensor, y: Tensor | None = None, y_mask: Tensor | None = None) -> None:
        """The forward of a write, without the cache's bookkeeping: one pass at t=0 with the mask channel 1 that
        stores each block's K/V. The cache must have begun a write of T frames. This is what a CUDA graph of the
        write captures (`server/engine/graphs.py`)."""
        b, _, t_len = clean.shape[:3]
        self._check_cache(cache, b)
        p = _Pass(
            mode="write",
            tpe=self._tpe(cache.positions(), b, t_len, clean.device),
            mask_channel=torch.ones(b, t_len, device=clean.device),
            cache=cache,
        )
        t = torch.zeros(b, t_len, device=clean.device)
        self._run(x=clean, t=t, p=p, y=y, y_mask=y_mask)

    @torch.no_grad()
    def denoise(
        self, cache: KVCache, x: Tensor, t: Tensor, y: Tensor | None = None, y_mask: Tensor | None = None
    ) -> Tensor:
        """Epsilon | variance (B, 2C, T, H, W) of a noisy chunk at timesteps t (B,) against the cache."""
        b, _, t_len = x.shape[:3]
        self._check_cache(cache, b)
        p = _Pass(
            mode="denoise",
            tpe=self._tpe(cache.positions(), b, t_len, x.device),
            mask_channel=torch.zeros(b, t_len, device=x.device),
            cache=cache,
        )
        return self._run(x, t[:, None].expand(b, t_len), p, y, y_mask)

    # ---- internals -------------------------------------------------------------------------------------

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        if cache.batch_size != batch:
            raise ValueError(f"cache holds {cache.batch_size} streams but the input has {batch}")

    def _tpe(self, start: Tensor | int, batch: int, num_frames: int, device: torch.device) -> Tensor:
        """(B, T, C) cyclic temporal position embedding for frames start .. start+T-1."""
        frames = torch.arange(num_frames, device=device)
        if isinstance(start, int):  # no host-to-device copy (a stream sync) for a Python offset
            idx = ((frames + start) % self.config.max_tpe_len).expand(batch, num_frames)
        else:
            start_t = torch.as_tensor(start, device=device).reshape(-1).expand(batch)
            idx = (start_t[:, None] + frames) % self.config.max_tpe_len
        return self.pos_embed_temporal[0, idx]

    def _run(self, x: Tensor, t: Tensor, p: _Pass, y: Tensor | None, y_mask: Tensor | None) -> Tensor:
        cfg = self.config
        b, _, t_len, hh, ww = x.shape
        if (hh, ww) != tuple(cfg.input_size[1:]):
            raise ValueError(f"latent size {(hh, ww)} does not match the model's {tuple(cfg.input_size[1:])}")
        dtype = self.x_embedder.proj.weight.dtype

        # 1. embed patches (+ fixed spatial PE) and per-frame timesteps. Under autocast (training) the input
        #    and output projections stay in the parameters' dtype: near t = T epsilon ~ x_t and the data is
        #    only sqrt(alpha_bar) ~ 0.006 of it, below bf16's resolution, so a bf16 copy path x_t -> eps
        #    leaves the model nothing to learn about x0 there (it then ignores the context at high noise).
        with _full_precision(x):
            h = self.x_embedder(x.to(dtype)).view(b, t_len, cfg.num_spatial, -1)
        h = h + self.pos_embed[:, None].to(dtype)
        t_emb = self.t_embedder(t, dtype)  # (B, T, C)
        t_mlp = self.t_block(t_emb)  # (B, T, 6C)
        p.tpe = p.tpe.to(dtype)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is caption-conditioned: pass y (B, N_tok, caption_channels)")
            p.y = self.y_embedder(y.reshape(b, -1, y.shape[-1]).to(dtype))
            p.y_mask = None if y_mask is None else y_mask.reshape(b, -1)

        # 2. blocks
        for i, block in enumerate(self.blocks):
            h = block(h, t_mlp, p, is_last=i == len(self.blocks) - 1)
        if p.mode == "write":
            return h

        # 3. per-frame final modulation and unpatchify
        with _full_precision(h):
            out = self.final_layer(h.to(dtype), t_emb.to(dtype))  # (B, T, S, ph*pw*C_out)
        return self._unpatchify(out).float()

    def _unpatchify(self, x: Tensor) -> Tensor:
        cfg = self.config
        b, t_len = x.shape[:2]
        (gh, gw), (_, ph, pw) = cfg.grid_size, cfg.patch_size
        x = x.view(b, t_len, gh, gw, ph, pw, cfg.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, cfg.out_channels, t_len, gh * ph, gw * pw)

    # ---- initialisation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def randomize_(self, seed: int = 0, std_scale: float = 1.0) -> CausalSTDiT:
        """Random, non-degenerate weights (tests and benchmarks): N(0, std_scale^2 / fan_in) weights,
        small random biases and modulation tables. Unlike training init, no output layer is zeroed, so
        every path of the network influences the output. The random buffers (the begin-of-video token, the null
        caption) are drawn again from the same seed, so that every process builds the same model (a cluster's
        replicas of a random model generate the same video for a seed)."""
        gen = torch.Generator().manual_seed(seed)
        for name, buf in self.named_buffers():
            if (dim := RANDOM_BUFFERS.get(name.rsplit(".", 1)[-1])) is not None:
                buf.copy_(torch.randn(buf.shape, generator=gen) / buf.shape[dim] ** 0.5)
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                std = std_scale / fan_in**0.5
            else:
                std = 0.02
            if name.endswith("scale_shift_table"):
                std = 0.1
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        return self


def history_mask(chunk_lengths: list[int], max_cache_frames: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, N) temporal mask that makes a recompute pass over a whole history equal the cached path.

    Frame j of chunk c attends to frame i <= j when i is in chunk c or was in the cache while chunk c was
    processed, i.e. among the last `max_cache_frames` frames before chunk c started. Before the queue
    first dequeues this is the plain causal mask.
    """
    starts = torch.tensor([0, *chunk_lengths[:-1]], device=device).cumsum(0)
    chunk_start = torch.repeat_interleave(starts, torch.tensor(chunk_lengths, device=device))  # (N,)
    pos = torch.arange(len(chunk_start), device=device)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] >= (chunk_start - max_cache_frames)[:, None])
