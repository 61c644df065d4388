"""The model runner: owns the tensors (model, codec, page pool, each session's latents) and executes what the
scheduler planned. It reads sessions' parameters and never changes scheduler state; each session's device state
lives here, in a `GenerationState` created at prefill and dropped at release.

Every session draws its noise from its own generator in a fixed order (condition-frame perturbation,
chunk noise, per-step noise, perturbation of the finished chunk, next chunk noise...), the same order as
the offline loop in `server/model/generate.py`, so a session's frames do not depend on which other
sessions shared its batches.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ca2vdm.server.cache.block_manager import PageManager, StreamPages
from ca2vdm.server.cache.paged import PagedKVCache, to_device
from ca2vdm.server.cache.pool import KVPool
from ca2vdm.server.model.codecs import frames_to_uint8, uint8_to_frames
from ca2vdm.server.model.diffusion import Sampler
from ca2vdm.server.model.generate import perturb_for_cache
from ca2vdm.server.model.layers import take
from ca2vdm.server.model.loader import Pipeline

from .config import EngineConfig
from .graphs import GraphedDenoiser, GraphedWriter
from .session import Session, SessionParams


@dataclass(eq=False)
class GenerationState:
    """One session's generation on the device: its cache pages, sampler, noise generator and the chunk in flight."""

    pages: StreamPages
    sampler: Sampler
    timesteps: list[int]  # the sampler's model timesteps, by denoising index
    generator: torch.Generator
    x: Tensor  # (1, C, T, h, w) latents of the chunk being denoised
    step: int  # next denoising index, counting down; -1: the chunk is finished
    history: list[Tensor]  # the latents written to the cache, chunk by chunk: at least the last max_cache_frames
    x0_prev: Tensor | None = None  # a multistep sampler's x0 estimate of the previous step (zeros at a chunk's start)

    def remember(self, written: Tensor, max_frames: int) -> None:
        """Keep a written chunk (1, C, T, h, w), and drop chunks that no longer hold any of the last `max_frames`."""
        self.history.append(written)
        total = sum(h.shape[2] for h in self.history)
        while total - self.history[0].shape[2] >= max_frames:
            total -= self.history.pop(0).shape[2]


def _no_estimate(sampler: Sampler, x: Tensor) -> Tensor | None:
    """A multistep sampler's "previous x0" at a chunk's first step (zeros, which its first index ignores)."""
    return torch.zeros_like(x) if sampler.multistep else None


@dataclass(eq=False)
class HostState:
    """A session's generation without pages (an unloaded session, or one saved to disk): enough to rebuild its cache
    with one write and go on drawing the same noise. Tensors on the CPU."""

    history: Tensor  # (1, C, N, h, w): the last N <= max_cache_frames latents written, as they were written
    first_frame: int  # absolute index of the history's first frame
    x: Tensor  # (1, C, T, h, w) the chunk in flight
    step: int
    generator: Tensor  # the noise generator's state
    x0_prev: Tensor | None = None  # a multistep sampler's previous x0 estimate (None: zeros)

    @property
    def nbytes(self) -> int:
        kept = (self.history, self.x, self.generator, *([self.x0_prev] if self.x0_prev is not None else []))
        return sum(t.numel() * t.element_size() for t in kept)


class PhaseTimer:
    """Times runner phases without waiting for the GPU: CUDA events, read once they have completed (wall time on
    the CPU, where every phase is synchronous). Samples are (phase, batch size, seconds): "step" (one denoising
    forward and sampler update), "decode" (finished chunks to frames), "write" (finished chunks into the cache)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: deque[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._done: list[tuple[str, int, float]] = []

    @contextmanager
    def __call__(self, phase: str, batch: int) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            self._done.append((phase, batch, time.perf_counter() - start))
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._open.append((phase, batch, begin, end))

    def take(self) -> list[tuple[str, int, float]]:
        """The samples completed since the last call (never waits)."""
        while self._open and self._open[0][3].query():
            phase, batch, begin, end = self._open.popleft()
            self._done.append((phase, batch, begin.elapsed_time(end) / 1e3))
        done, self._done = self._done, []
        return done


class ModelRunner:
    def __init__(self, pipe: Pipeline, config: EngineConfig) -> None:
        self.pipe = pipe
        self.model = pipe.model
        cfg = pipe.config
        self.chunk_frames = cfg.chunk_frames
        self.perturb_t = cfg.prefix_perturb_t
        mc = cfg.model
        self.latent_shape = (mc.in_channels, cfg.chunk_frames, *mc.input_size[1:])  # (C, T, h, w)
        # exactly a full queue and its prefix pages per admitted session: admitted means its pages exist, and a
        # write replaces dequeued pages in place, so a full queue never needs more (see docs/cache.md)
        dtype = next(self.model.parameters()).dtype
        self.pool = KVPool.for_sessions(mc, config.max_sessions, cfg.max_cache_frames, pipe.device, dtype)
        self.pages = PageManager(self.pool.num_pages, self.pool.num_prefix_pages, mc.prefix_frames,
                                 cfg.max_cache_frames)  # fmt: skip
        self.max_cache_frames = cfg.max_cache_frames
        self.states: dict[str, GenerationState] = {}
        self.unloaded: dict[str, HostState] = {}  # sessions without pages that a prefill rebuilds
        self._samplers: dict[tuple[str, int], tuple[Sampler, list[int]]] = {}
        self.graphs: GraphedDenoiser | None = None
        self.writer: GraphedWriter | None = None
        if config.cuda_graphs and pipe.device.type == "cuda":
            self.graphs = GraphedDenoiser(self.model, self.pool, self.pages, self.latent_shape, config.max_batch)
            self.writer = GraphedWriter(self.model, self.pool, self.pages, self.latent_shape, config.max_batch,
                                        frame_counts=(1, cfg.chunk_frames), mempool=self.graphs.mempool)  # fmt: skip
        self._warm_up_batches = sorted({1, min(2, config.max_sessions, config.max_batch)})
        largest = min(config.max_sessions, config.max_batch)
        self._measure_batches = sorted({1, min(2, largest), largest})
        self.timer = PhaseTimer(pipe.device)

    def capture_graphs(self) -> None:
        """Capture every CUDA graph now (server warm-up), so no session pays for a capture."""
        if self.graphs is not None and self.writer is not None:
            self.graphs.capture_all()
            self.writer.capture_all()

    @torch.no_grad()
    def warm_up(self) -> list[tuple[str, int, float]]:
        """Server warm-up: capture every CUDA graph, then run throwaway sessions through each phase once
        (prefill with an image, a denoising step, decode, cache write) and give their pages back, so the first
        real session meets loaded kernels, chosen codec algorithms and cached buffers. Measured on an H200
        (random XL/2, bench/results/first_clip_h200.json): without it the first session after start waited
        613 ms for its first clip (prefill 302 ms, decode 92 ms), the next ones 255-264 ms.
        Then it measures each phase, warm, at batch sizes 1, 2 and the largest batch (the real-time capacity
        model's first data) and returns those samples."""
        self.capture_graphs()
        h, w = self.pipe.frame_size
        image = torch.zeros((h, w, 3), dtype=torch.uint8)
        # and two sessions, where the pool and batch allow: the decode then sees 2 chunks (a micro-batch of 16)
        for n in self._warm_up_batches:
            self._run_throwaway([Session(SessionParams(image=image)) for _ in range(n)], steps=1)
        self._sync()
        self.timer.take()  # the first runs include compilation and algorithm searches
        for n in self._measure_batches:
            self._run_throwaway([Session(SessionParams()) for _ in range(n)], steps=3)
        self._sync()
        return self.timer.take()

    def _run_throwaway(self, sessions: list[Session], steps: int) -> None:
        try:
            self.prefill(sessions)
            for _ in range(steps):
                self.denoise(sessions)
            self.decode_chunks(sessions, [self.chunk_frames] * len(sessions))
            self.continue_chunks(sessions)
        finally:
            for s in sessions:
                self.release(s)

    def _sync(self) -> None:
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- the forwards (CUDA graphs where captured, else eager over a cache of exactly the batch) ------------

    def _denoise_forward(self, streams: list[StreamPages], x: Tensor, t: Tensor) -> Tensor:
        if self.graphs is not None:
            return self.graphs(streams, x, t)
        return self.model.denoise(PagedKVCache(self.pool, self.pages, streams), x, t)  # (B, 2C, T, h, w)

    def _write(self, streams: list[StreamPages], x: Tensor) -> None:
        """Append clean chunks x (B, C, T, h, w) to the streams' caches: one batched write forward."""
        if self.writer is not None:
            self.writer(streams, x)
        else:
            self.model.write(PagedKVCache(self.pool, self.pages, streams), x)

    # ---- the phases ------------------------------------------------------------------------------------------

    def _sampler(self, name: str, steps: int) -> tuple[Sampler, list[int]]:
        if (name, steps) not in self._samplers:
            sampler = self.pipe.sampler(name, steps).to(self.pipe.device)
            self._samplers[(name, steps)] = (sampler, sampler.timesteps.tolist())
        return self._samplers[(name, steps)]

    def _chunk_noise(self, generator: torch.Generator) -> Tensor:
        return torch.randn((1, *self.latent_shape), generator=generator, device=self.pipe.device)

    @torch.no_grad()
    def prefill(self, sessions: list[Session]) -> list[Tensor | None]:
        """Write each session's condition frame (its image, or the <BOV> frame) into a fresh stream, or for an
        unloaded session rebuild its cache from its kept history (`rebuild`). Returns frame 0 (1, H, W, 3) uint8 on
        the CPU for new sessions with an image, else None."""
        fresh = [s for s in sessions if s.id not in self.unloaded]
        for s in sessions:
            if s.id in self.unloaded:
                self.rebuild(s)
        frame0 = dict(zip(fresh, self._prefill(fresh), strict=True)) if fresh else {}
        return [frame0.get(s) for s in sessions]

    def _prefill(self, sessions: list[Session]) -> list[Tensor | None]:
        dev = self.pipe.device
        streams = [self.pages.new_stream() for _ in sessions]
        samplers = [self._sampler(s.params.sampler, s.params.steps) for s in sessions]
        generators = [torch.Generator(dev).manual_seed(s.params.seed) for s in sessions]
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
        x = torch.cat([perturb_for_cache(f, sampler, self.perturb_t, gen)
                       for f, (sampler, _), gen in zip(firsts, samplers, generators, strict=True)])  # fmt: skip
        self._write(streams, x)  # may raise OutOfPages: no state is registered before it succeeded
        for i, (s, st, (sampler, timesteps), gen) in enumerate(zip(sessions, streams, samplers, generators,
                                                                   strict=True)):  # fmt: skip
            noise = self._chunk_noise(gen)
            self.states[s.id] = GenerationState(st, sampler, timesteps, gen, noise, step=sampler.num_steps - 1,
                                                history=[x[i : i + 1]],
                                                x0_prev=_no_estimate(sampler, noise))  # fmt: skip
        return frame0

    # ---- unloading and rebuilding (resumed sessions) ------------------------------------------------------

    def host_state(self, session: Session) -> HostState:
        """The session's generation as host tensors (for unloading, or saving it to disk)."""
        if session.id in self.unloaded:
            return self.unloaded[session.id]
        g = self.states[session.id]
        history = torch.cat(g.history, dim=2)[:, :, -self.max_cache_frames :]
        return HostState(history=history.cpu(), first_frame=g.pages.num_written - history.shape[2], x=g.x.cpu(),
                         step=g.step, generator=g.generator.get_state(),
                         x0_prev=g.x0_prev.cpu() if g.x0_prev is not None else None)  # fmt: skip

    def unload(self, session: Session) -> None:
        """Free the session's pages and keep its generation in host memory (a later prefill rebuilds it)."""
        if session.id in self.states:
            state = self.host_state(session)
            self.release(session)
            self.unloaded[session.id] = state

    def rebuild(self, session: Session) -> None:
        """Give an unloaded session pages again: its kept history goes into a fresh stream, positioned where it was,
        in one write (the write's temporal attention is causal, so before the queue ever dequeued this is the cache
        the session had, up to float rounding; after, the oldest kept frames no longer see the dequeued ones)."""
        dev = self.pipe.device
        h = self.unloaded[session.id]
        sampler, timesteps = self._sampler(session.params.sampler, session.params.steps)
        stream = self.pages.new_stream(first_frame=h.first_frame)
        history = h.history.to(dev)
        self.model.write(PagedKVCache(self.pool, self.pages, [stream]), history)  # may raise OutOfPages
        generator = torch.Generator(dev)
        generator.set_state(h.generator)
        x = h.x.to(dev)
        x0_prev = h.x0_prev.to(dev) if h.x0_prev is not None else _no_estimate(sampler, x)
        self.states[session.id] = GenerationState(stream, sampler, timesteps, generator, x, h.step,
                                                  history=[history], x0_prev=x0_prev)  # fmt: skip
        del self.unloaded[session.id]

    def restore(self, session: Session, state: HostState) -> None:
        """Register a saved session (read back from disk) as unloaded: its next prefill rebuilds it."""
        self.unloaded[session.id] = state

    @torch.no_grad()
    def denoise(self, sessions: list[Session]) -> list[Session]:
        """One denoising step for every session (one batched forward; each at its own index and cache length).
        Returns the sessions whose chunk is now finished (ready for `decode_chunks`)."""
        with self.timer("step", len(sessions)):
            return self._denoise(sessions)

    def _denoise(self, sessions: list[Session]) -> list[Session]:
        dev = self.pipe.device
        gens = [self.states[s.id] for s in sessions]
        x = torch.cat([g.x for g in gens])
        t = to_device(torch.tensor([g.timesteps[g.step] for g in gens]), dev)  # nothing in a step waits for the GPU
        out = self._denoise_forward([g.pages for g in gens], x, t)
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(gens):
            groups.setdefault(id(g.sampler), []).append(i)
        for idx in groups.values():
            sampler = gens[idx[0]].sampler
            noise = None
            if sampler.needs_noise:
                noise = torch.cat([torch.randn(x.shape[1:], generator=gens[i].generator, device=dev)[None]
                                   for i in idx])  # fmt: skip
            k = to_device(torch.tensor([gens[i].step for i in idx]), dev)
            xg, outg = take(x, idx, 0), take(out, idx, 0)  # no index copy to the GPU
            x0 = prev = None
            if sampler.multistep:  # each session's previous estimate in, this step's out
                prev = torch.cat([gens[i].x0_prev for i in idx])  # type: ignore[misc]
                x0 = sampler.predict_x0(xg, outg, k)
            new_x = sampler.step(xg, outg, k, noise, x0_prev=prev)
            for j, i in enumerate(idx):
                gens[i].x = new_x[j : j + 1]
                gens[i].step -= 1
                if x0 is not None:
                    gens[i].x0_prev = x0[j : j + 1]
        return [s for s, g in zip(sessions, gens, strict=True) if g.step < 0]

    @torch.no_grad()
    def decode_chunks(self, sessions: list[Session], num_frames: list[int]) -> list[Tensor]:
        """Each finished chunk's first `num_frames[i]` frames, (n, H, W, 3) uint8 on the CPU (one batched decode).
        Each clip owns its memory: a consumer that keeps one (a job, a slow reader) keeps n frames, not the batch."""
        with self.timer("decode", len(sessions)):
            x = torch.cat([self.states[s.id].x for s in sessions])
            frames = frames_to_uint8(self.pipe.codec.decode(x)).cpu()  # (B, T, H, W, 3)
        return [frames[i, :n].clone() for i, n in enumerate(num_frames)]

    @torch.no_grad()
    def continue_chunks(self, sessions: list[Session]) -> None:
        """Write the finished chunks of sessions that go on into their caches (one batched write) and start
        their next chunk."""
        gens = [self.states[s.id] for s in sessions]
        with self.timer("write", len(sessions)):
            clean = torch.cat([perturb_for_cache(g.x, g.sampler, self.perturb_t, g.generator) for g in gens])
            self._write([g.pages for g in gens], clean)
        for i, g in enumerate(gens):
            g.remember(clean[i : i + 1], self.max_cache_frames)
            g.x, g.step = self._chunk_noise(g.generator), g.sampler.num_steps - 1
            g.x0_prev = _no_estimate(g.sampler, g.x)

    def steps_left(self, session: Session) -> int:
        """Denoising steps left in the session's chunk in flight."""
        return self.states[session.id].step + 1

    def release(self, session: Session) -> None:
        """Give the session's pages back to the pool and drop its tensors (a no-op for a session never prefilled)."""
        self.unloaded.pop(session.id, None)
        g = self.states.pop(session.id, None)
        if g is not None:
            self.pages.release(g.pages)

    @property
    def num_pages(self) -> int:
        """Temporal pages sessions can hold (the pool has one more: the scratch page of padded graph rows)."""
        return self.pages.temporal.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.pages.temporal.num_free
