"""The model runner: owns the tensors (model, codec, page pool, each session's latents) and executes what the
scheduler planned. It never changes scheduler state.

Every session draws its noise from its own generator in a fixed order (condition-frame perturbation,
chunk noise, per-step noise, perturbation of the finished chunk, next chunk noise...), the same order as
the offline loop in `server/model/generate.py`, so a session's frames do not depend on which other
sessions shared its batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.cache.block_manager import PageManager
from server.cache.paged import PagedKVCache, to_device
from server.cache.pool import KVPool
from server.model.codecs import frames_to_uint8, uint8_to_frames
from server.model.diffusion import Sampler
from server.model.generate import perturb_for_cache
from server.model.layers import take
from server.model.loader import Pipeline

from .graphs import GraphedDenoiser, GraphedWriter
from .scheduler import SchedulerConfig
from .session import Session, SessionParams


class ModelRunner:
    def __init__(self, pipe: Pipeline, config: SchedulerConfig, cuda_graphs: bool = True) -> None:
        self.pipe = pipe
        self.model = pipe.model
        cfg = pipe.config
        self.chunk_frames = cfg.chunk_frames
        self.max_frames = cfg.max_cache_frames
        self.perturb_t = cfg.prefix_perturb_t
        self.max_sessions, self.max_batch = config.max_sessions, config.max_batch
        mc = cfg.model
        self.latent_shape = (mc.in_channels, cfg.chunk_frames, *mc.input_size[1:])  # (C, T, h, w)
        # exactly a full queue and its prefix pages per admitted session: sessions share no pages yet, so a
        # write replaces dequeued pages in place and never needs transient ones (see docs/cache.md)
        num_pages = config.max_sessions * cfg.max_cache_frames
        num_prefix = config.max_sessions * max(mc.prefix_frames, 1)
        dtype = next(self.model.parameters()).dtype
        # one spare page of each kind (the last ids), owned by no stream: padded rows of write graphs write there
        self.pool = KVPool(mc, num_pages + 1, num_prefix + 1, pipe.device, dtype)
        self.pages = PageManager(num_pages, num_prefix, mc.prefix_frames)
        self._samplers: dict[tuple[str, int], tuple[Sampler, list[int]]] = {}
        self.graphs = None
        self.writer = None
        if cuda_graphs and pipe.device.type == "cuda":
            self.graphs = GraphedDenoiser(
                self.model, self.pool, self.pages, cfg.max_cache_frames, self.latent_shape, config.max_batch
            )
            self.writer = GraphedWriter(
                self.model, self.pool, self.pages, cfg.max_cache_frames, self.latent_shape, config.max_batch,
                frame_counts=(1, cfg.chunk_frames), scratch=(num_pages, num_prefix), mempool=self.graphs.mempool,
            )  # fmt: skip

    def capture_graphs(self) -> None:
        """Capture every CUDA graph now (server warm-up), so no session pays for a capture."""
        if self.graphs is not None and self.writer is not None:
            self.graphs.capture_all()
            self.writer.capture_all()

    @torch.no_grad()
    def warm_up(self) -> None:
        """Server warm-up: capture every CUDA graph, then run throwaway sessions through each phase once
        (prefill with an image, a denoising step, decode, cache write) and give their pages back, so the first
        real session meets loaded kernels, chosen codec algorithms and cached buffers. Measured on an H200
        (random XL/2, bench/results/first_clip_h200.json): without it the first session after start waited
        613 ms for its first clip (prefill 302 ms, decode 92 ms), the next ones 255-264 ms."""
        self.capture_graphs()
        h, w = self.pipe.frame_size
        image = torch.zeros((h, w, 3), dtype=torch.uint8)
        # and two sessions, where the pool and batch allow: the decode then sees 2 chunks (a micro-batch of 16)
        for n in sorted({1, min(2, self.max_sessions, self.max_batch)}):
            sessions = [Session(SessionParams(image=image)) for _ in range(n)]
            try:
                self.prefill(sessions)
                self.denoise(sessions)
                self.decode_chunks(sessions, [self.chunk_frames] * n)
                self.continue_chunks(sessions)
            finally:
                for s in sessions:
                    self.release(s)
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()

    def _write(self, sessions: list[Session], x: Tensor) -> None:
        """Append clean chunks x (B, C, T, h, w) to the sessions' caches: one batched write forward."""
        if self.writer is not None:
            self.writer([s.pages for s in sessions], x)  # type: ignore[misc]
        else:
            self.model.write(self._cache(sessions), x)

    def _sampler(self, name: str, steps: int) -> tuple[Sampler, list[int]]:
        if (name, steps) not in self._samplers:
            sampler = self.pipe.sampler(name, steps).to(self.pipe.device)
            self._samplers[(name, steps)] = (sampler, sampler.timesteps.tolist())
        return self._samplers[(name, steps)]

    def _cache(self, sessions: list[Session]) -> PagedKVCache:
        return PagedKVCache(self.pool, self.pages, [s.pages for s in sessions])  # type: ignore[misc]

    def _new_chunk(self, s: Session) -> None:
        assert s.generator is not None and s.sampler is not None
        s.x = torch.randn((1, *self.latent_shape), generator=s.generator, device=self.pipe.device)
        s.k = s.sampler.num_steps - 1

    @torch.no_grad()
    def prefill(self, sessions: list[Session]) -> list[Tensor | None]:
        """Write each session's condition frame (its image, or the <BOV> frame) into a fresh stream.
        Returns frame 0 (1, H, W, 3) uint8 on the CPU for sessions with an image, else None."""
        dev = self.pipe.device
        for s in sessions:
            s.generator = torch.Generator(dev).manual_seed(s.params.seed)
            s.sampler = self._sampler(s.params.sampler, s.params.steps)[0]
            s.pages = self.pages.new_stream(self.max_frames)
        with_image = [i for i, s in enumerate(sessions) if s.params.image is not None]
        firsts: list[Tensor] = [self.model.bov_token[None, :, None].float()] * len(sessions)  # (1, C, 1, h, w)
        frame0: list[Tensor | None] = [None] * len(sessions)
        if with_image:
            images = torch.stack([sessions[i].params.image for i in with_image]).to(dev)  # type: ignore[misc]
            latents = self.pipe.codec.encode(uint8_to_frames(images[:, None]))  # (N, C, 1, h, w)
            decoded = frames_to_uint8(self.pipe.codec.decode(latents)).cpu()  # (N, 1, H, W, 3)
            for j, i in enumerate(with_image):
                firsts[i] = latents[j : j + 1]
                frame0[i] = decoded[j]
        x = torch.cat(
            [
                perturb_for_cache(f, s.sampler, self.perturb_t, s.generator)  # type: ignore[arg-type]
                for f, s in zip(firsts, sessions, strict=True)
            ]
        )
        self._write(sessions, x)
        for s in sessions:
            self._new_chunk(s)
        return frame0

    @torch.no_grad()
    def denoise(self, sessions: list[Session]) -> None:
        """One denoising step for every session (one batched forward; each at its own index and cache length)."""
        dev = self.pipe.device
        x = torch.cat([s.x for s in sessions])  # type: ignore[misc]
        timesteps = [self._sampler(s.params.sampler, s.params.steps)[1][s.k] for s in sessions]
        t = to_device(torch.tensor(timesteps), dev)  # nothing in a step waits for the GPU
        if self.graphs is not None:
            out = self.graphs([s.pages for s in sessions], x, t)  # type: ignore[misc]
        else:
            out = self.model.denoise(self._cache(sessions), x, t)  # (B, 2C, T, h, w)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(sessions):
            groups.setdefault(id(s.sampler), []).append(i)
        for idx in groups.values():
            sampler = sessions[idx[0]].sampler
            assert sampler is not None
            noise = None
            if sampler.needs_noise:
                noise = torch.cat([torch.randn(x.shape[1:], generator=sessions[i].generator, device=dev)[None]
                                   for i in idx])  # fmt: skip
            k = to_device(torch.tensor([sessions[i].k for i in idx]), dev)
            new_x = sampler.step(take(x, idx, 0), take(out, idx, 0), k, noise)  # no index copy to the GPU
            for j, i in enumerate(idx):
                sessions[i].x = new_x[j : j + 1]
                sessions[i].k -= 1

    @torch.no_grad()
    def decode_chunks(self, sessions: list[Session], num_frames: list[int]) -> list[Tensor]:
        """Each finished chunk's first `num_frames[i]` frames, (n, H, W, 3) uint8 on the CPU (one batched decode)."""
        x = torch.cat([s.x for s in sessions])  # type: ignore[misc]
        frames = frames_to_uint8(self.pipe.codec.decode(x)).cpu()  # (B, T, H, W, 3)
        return [frames[i, :n] for i, n in enumerate(num_frames)]

    @torch.no_grad()
    def continue_chunks(self, sessions: list[Session]) -> None:
        """Write the finished chunks of sessions that go on into their caches (one batched write) and start
        their next chunk."""
        clean = torch.cat([perturb_for_cache(s.x, s.sampler, self.perturb_t, s.generator) for s in sessions])  # type: ignore[arg-type]
        self._write(sessions, clean)
        for s in sessions:
            self._new_chunk(s)

    def release(self, session: Session) -> None:
        """Give the session's pages back to the pool and drop its tensors."""
        if session.pages is not None:
            self.pages.release(session.pages)
            session.pages = None
        session.x = None
        session.generator = None

    @property
    def num_pages(self) -> int:
        """Temporal pages sessions can hold (the pool has one more: the write graphs' scratch page)."""
        return self.pages.temporal.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.pages.temporal.num_free
