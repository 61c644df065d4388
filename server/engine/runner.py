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
from server.cache.paged import PagedKVCache
from server.cache.pool import KVPool
from server.model.codecs import frames_to_uint8, uint8_to_frames
from server.model.diffusion import Sampler
from server.model.generate import perturb_for_cache
from server.model.loader import Pipeline

from .graphs import GraphedDenoiser
from .scheduler import SchedulerConfig
from .session import Session


class ModelRunner:
    def __init__(self, pipe: Pipeline, config: SchedulerConfig, cuda_graphs: bool = True) -> None:
        self.pipe = pipe
        self.model = pipe.model
        cfg = pipe.config
        self.chunk_frames = cfg.chunk_frames
        self.max_frames = cfg.max_cache_frames
        self.perturb_t = cfg.prefix_perturb_t
        mc = cfg.model
        self.latent_shape = (mc.in_channels, cfg.chunk_frames, *mc.input_size[1:])  # (C, T, h, w)
        # exactly a full queue and its prefix pages per admitted session: sessions share no pages yet, so a
        # write replaces dequeued pages in place and never needs transient ones (see docs/cache.md)
        num_pages = config.max_sessions * cfg.max_cache_frames
        num_prefix = config.max_sessions * max(mc.prefix_frames, 1)
        dtype = next(self.model.parameters()).dtype
        self.pool = KVPool(mc, num_pages, num_prefix, pipe.device, dtype)
        self.pages = PageManager(num_pages, num_prefix, mc.prefix_frames)
        self._samplers: dict[tuple[str, int], tuple[Sampler, list[int]]] = {}
        self.graphs = None
        if cuda_graphs and pipe.device.type == "cuda":
            self.graphs = GraphedDenoiser(
                self.model, self.pool, self.pages, cfg.max_cache_frames, self.latent_shape, config.max_batch
            )

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
        self.model.write(self._cache(sessions), x)
        for s in sessions:
            self._new_chunk(s)
        return frame0

    @torch.no_grad()
    def denoise(self, sessions: list[Session]) -> None:
        """One denoising step for every session (one batched forward; each at its own index and cache length)."""
        dev = self.pipe.device
        x = torch.cat([s.x for s in sessions])  # type: ignore[misc]
        timesteps = [self._sampler(s.params.sampler, s.params.steps)[1][s.k] for s in sessions]
        t = torch.tensor(timesteps, device=dev)
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
            k = torch.tensor([sessions[i].k for i in idx], device=dev)
            new_x = sampler.step(x[idx], out[idx], k, noise)
            for j, i in enumerate(idx):
                sessions[i].x = new_x[j : j + 1]
                sessions[i].k -= 1

    @torch.no_grad()
    def finish_chunks(self, sessions: list[Session], num_frames: list[int], continues: list[bool]) -> list[Tensor]:
        """Decode each finished chunk's first `num_frames[i]` frames ((n, H, W, 3) uint8 on the CPU); write
        the chunks of sessions that continue into their caches (one batched write) and start their next chunk."""
        x = torch.cat([s.x for s in sessions])  # type: ignore[misc]
        frames = frames_to_uint8(self.pipe.codec.decode(x)).cpu()  # (B, T, H, W, 3)
        writers = [s for s, c in zip(sessions, continues, strict=True) if c]
        if writers:
            clean = torch.cat([perturb_for_cache(s.x, s.sampler, self.perturb_t, s.generator) for s in writers])  # type: ignore[arg-type]
            self.model.write(self._cache(writers), clean)
            for s in writers:
                self._new_chunk(s)
        return [frames[i, :n] for i, n in enumerate(num_frames)]

    def release(self, session: Session) -> None:
        """Give the session's pages back to the pool and drop its tensors."""
        if session.pages is not None:
            self.pages.release(session.pages)
            session.pages = None
        session.x = None
        session.generator = None

    @property
    def num_free_pages(self) -> int:
        return self.pages.temporal.num_free
