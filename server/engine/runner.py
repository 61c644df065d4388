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
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ca2vdm.server.cache.block_manager import PageManager, StreamPages
from ca2vdm.server.cache.paged import PagedKVCache, to_device
from ca2vdm.server.cache.pool import KVPool
from ca2vdm.server.model.codecs import frames_to_uint8, uint8_to_frames
from ca2vdm.server.model.diffusion import Sampler, classifier_free_guidance
from ca2vdm.server.model.generate import perturb_for_cache
from ca2vdm.server.model.layers import take
from ca2vdm.server.model.loader import Pipeline

from .config import EngineConfig
from .graphs import GraphedDenoiser, GraphedWriter
from .session import Prompt, Session, SessionParams, rows_of


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
    caption: Caption | None = None  # text models: the prompt's features on the device (None: the null caption)
    uncond: StreamPages | None = None  # guided sessions: the unconditional branch's cache stream

    def streams(self) -> list[StreamPages]:
        """The session's forward rows: the unconditional stream first when guided (the reference's order)."""
        return [self.pages] if self.uncond is None else [self.uncond, self.pages]

    def remember(self, written: Tensor, max_frames: int) -> None:
        """Keep a written chunk (1, C, T, h, w), and drop chunks that no longer hold any of the last `max_frames`."""
        self.history.append(written)
        total = sum(h.shape[2] for h in self.history)
        while total - self.history[0].shape[2] >= max_frames:
            total -= self.history.pop(0).shape[2]


@dataclass(frozen=True, eq=False)
class Caption:
    """A prompt as the forwards use it: its features on the device, and the guidance scale."""

    prompt: Prompt
    y: Tensor  # (L, C) on the device
    mask: Tensor  # (L,) on the device


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
    prompt: Prompt | None = None  # the prompt in use (a switch mid-stream replaces the session's first one)
    pending: tuple[Prompt, bool] | None = None  # a switch asked for and not yet applied: (prompt, recache)

    @property
    def nbytes(self) -> int:
        kept = [self.history, self.x, self.generator, *([self.x0_prev] if self.x0_prev is not None else [])]
        for prompt in (self.prompt, self.pending[0] if self.pending is not None else None):
            if prompt is not None:
                kept += [prompt.y, prompt.mask]
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
        self.max_batch = config.max_batch  # rows per forward: a batch with guided sessions runs in several
        # text models: the null caption (the model's y_embedding buffer: the unconditional branch, and sessions
        # without a prompt) and an all-valid token mask for it
        self.takes_text = cfg.takes_text
        if self.takes_text:
            self.null_y = self.model.y_embedder.y_embedding.detach()  # type: ignore[union-attr]
            self.null_mask = torch.ones(self.null_y.shape[0], dtype=torch.long, device=pipe.device)
        self.pending_prompts: dict[str, tuple[Prompt, bool]] = {}  # session id -> (prompt, recache) at its next chunk
        self.states: dict[str, GenerationState] = {}
        self.unloaded: dict[str, HostState] = {}  # sessions without pages that a prefill rebuilds
        self._samplers: dict[tuple[str, int], tuple[Sampler, list[int]]] = {}
        self.graphs: GraphedDenoiser | None = None
        self.writer: GraphedWriter | None = None
        if config.cuda_graphs and pipe.device.type == "cuda":
            captions = (mc.model_max_length, mc.caption_channels) if self.takes_text else None
            self.graphs = GraphedDenoiser(self.model, self.pool, self.pages, self.latent_shape, config.max_batch,
                                          captions=captions)  # fmt: skip
            self.writer = GraphedWriter(self.model, self.pool, self.pages, self.latent_shape, config.max_batch,
                                        frame_counts=(1, cfg.chunk_frames), mempool=self.graphs.mempool,
                                        captions=captions)  # fmt: skip
        if config.compile_decoder and pipe.device.type == "cuda":
            pipe.codec.compile_decoder()  # compiled by the warm-up's decodes (one and two chunks)
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
    # A forward's rows: one per session, two for a guided session (unconditional first, with the null caption and
    # the prompt's token mask, as the reference builds its doubled batch); text models get each row's caption.

    def _rows(self, streams: list[list[StreamPages]], captions: list[Caption | None],
              x: Tensor) -> tuple[list[StreamPages], Tensor, Tensor | None, Tensor | None]:  # fmt: skip
        """Rows of sessions with these streams, captions and per-session inputs x (B, ...): (streams, x, y, mask)."""
        flat = [st for group in streams for st in group]
        if len(flat) != len(streams):
            x = torch.cat([x[i : i + 1].expand(len(group), *x.shape[1:]) for i, group in enumerate(streams)])
        if not self.takes_text:
            return flat, x, None, None
        ys, masks = [], []
        for group, c in zip(streams, captions, strict=True):
            y, mask = (self.null_y, self.null_mask) if c is None else (c.y, c.mask)
            if len(group) == 2:
                ys.append(self.null_y)
                masks.append(mask)
            ys.append(y)
            masks.append(mask)
        return flat, x, torch.stack(ys), torch.stack(masks)

    def _caption(self, prompt: Prompt | None) -> Caption | None:
        if prompt is None:
            return None
        if not self.takes_text:
            raise ValueError(f"model {self.pipe.name} takes no text prompt")
        dtype = self.null_y.dtype
        return Caption(prompt, prompt.y.to(self.pipe.device, dtype), prompt.mask.to(self.pipe.device))

    def _new_streams(self, prompt: Prompt | None, first_frame: int = 0) -> list[StreamPages]:
        """A fresh cache stream per row of a session with this prompt (may raise OutOfPages, leaving none)."""
        rows = 2 if prompt is not None and prompt.guided else 1
        made: list[StreamPages] = []
        try:
            for _ in range(rows):
                made.append(self.pages.new_stream(first_frame=first_frame))
        except BaseException:
            for st in made:
                self.pages.release(st)
            raise
        return made

    def _denoise_forward(self, streams: list[StreamPages], x: Tensor, t: Tensor, y: Tensor | None,
                         mask: Tensor | None) -> Tensor:  # fmt: skip
        outs = []
        for a in range(0, len(streams), self.max_batch):
            rows = slice(a, a + self.max_batch)
            yr, mr = (y[rows], mask[rows]) if y is not None and mask is not None else (None, None)
            if self.graphs is not None:
                outs.append(self.graphs(streams[rows], x[rows], t[rows], yr, mr))
            else:
                cache = PagedKVCache(self.pool, self.pages, streams[rows])
                outs.append(self.model.denoise(cache, x[rows], t[rows], yr, mr))  # (B, 2C, T, h, w)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _write(self, streams: list[list[StreamPages]], captions: list[Caption | None], x: Tensor,
               graphed: bool = True) -> None:  # fmt: skip
        """Append clean chunks x (B, C, T, h, w), one per session, to the sessions' caches (every row of a guided
        session: the same latents under its two captions): batched write forwards. `graphed` False: eager (a
        rebuild's many frames have no graph)."""
        flat, x, y, mask = self._rows(streams, captions, x)
        for a in range(0, len(flat), self.max_batch):
            rows = slice(a, a + self.max_batch)
            yr, mr = (y[rows], mask[rows]) if y is not None and mask is not None else (None, None)
            if self.writer is not None and graphed:
                self.writer(flat[rows], x[rows], yr, mr)
            else:
                self.model.write(PagedKVCache(self.pool, self.pages, flat[rows]), x[rows], yr, mr)

    def _guide(self, gens: list[GenerationState], out: Tensor) -> Tensor:
        """One output per session from the rows' outputs: a guided session's two rows combined (guidance on
        epsilon, the learned variance from the conditional row)."""
        if len(out) == len(gens):
            return out
        combined, i = [], 0
        for g in gens:
            if g.uncond is None:
                combined.append(out[i : i + 1])
                i += 1
            else:
                assert g.caption is not None
                scale = g.caption.prompt.guidance_scale
                combined.append(classifier_free_guidance(out[i + 1 : i + 2], out[i : i + 1], scale))
                i += 2
        return torch.cat(combined)

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
        prompts = [self.pending_prompts.pop(s.id, (s.params.prompt, False))[0] for s in sessions]
        captions = [self._caption(p) for p in prompts]
        streams: list[list[StreamPages]] = []
        try:
            for p in prompts:
                streams.append(self._new_streams(p))
        except BaseException:
            for group in streams:
                for st in group:
                    self.pages.release(st)
            raise
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
        try:
            self._write(streams, captions, x)  # may raise OutOfPages: no state is registered before it succeeded
        except BaseException:
            for group in streams:
                for st in group:
                    self.pages.release(st)
            raise
        for i, (s, group, (sampler, timesteps), gen) in enumerate(zip(sessions, streams, samplers, generators,
                                                                      strict=True)):  # fmt: skip
            noise = self._chunk_noise(gen)
            self.states[s.id] = GenerationState(
                group[-1], sampler, timesteps, gen, noise, step=sampler.num_steps - 1, history=[x[i : i + 1]],
                x0_prev=_no_estimate(sampler, noise), caption=captions[i], uncond=group[0] if len(group) == 2 else None
            )  # fmt: skip
        return frame0

    # ---- unloading and rebuilding (resumed sessions) ------------------------------------------------------

    def host_state(self, session: Session) -> HostState:
        """The session's generation as host tensors (for unloading, or saving it to disk)."""
        if session.id in self.unloaded:  # with a switch asked for while it waited for its rebuild, if any
            state = self.unloaded[session.id]
            return replace(state, pending=self.pending_prompts.get(session.id, state.pending))
        g = self.states[session.id]
        history = torch.cat(g.history, dim=2)[:, :, -self.max_cache_frames :]
        return HostState(history=history.cpu(), first_frame=g.pages.num_written - history.shape[2], x=g.x.cpu(),
                         step=g.step, generator=g.generator.get_state(),
                         x0_prev=g.x0_prev.cpu() if g.x0_prev is not None else None,
                         prompt=g.caption.prompt if g.caption is not None else None,
                         pending=self.pending_prompts.get(session.id))  # fmt: skip

    def unload(self, session: Session) -> None:
        """Free the session's pages and keep its generation in host memory (a later prefill rebuilds it)."""
        if session.id in self.states:
            state = self.host_state(session)  # with a switch not yet applied (release drops it here)
            self.release(session)
            self.unloaded[session.id] = state

    def rebuild(self, session: Session) -> None:
        """Give an unloaded session pages again: its kept history goes into a fresh stream, positioned where it was,
        in one write (the write's temporal attention is causal, so before the queue ever dequeued this is the cache
        the session had, up to float rounding; after, the oldest kept frames no longer see the dequeued ones)."""
        dev = self.pipe.device
        h = self.unloaded[session.id]
        sampler, timesteps = self._sampler(session.params.sampler, session.params.steps)
        caption = self._caption(h.prompt)
        history = h.history.to(dev)
        group = self._write_fresh(h.prompt, caption, history, h.first_frame)  # may raise OutOfPages
        generator = torch.Generator(dev)
        generator.set_state(h.generator)
        x = h.x.to(dev)
        x0_prev = h.x0_prev.to(dev) if h.x0_prev is not None else _no_estimate(sampler, x)
        self.states[session.id] = GenerationState(group[-1], sampler, timesteps, generator, x, h.step,
                                                  history=[history], x0_prev=x0_prev, caption=caption,
                                                  uncond=group[0] if len(group) == 2 else None)  # fmt: skip
        if h.pending is not None:  # a switch asked for before it was unloaded (a newer one stays)
            self.pending_prompts.setdefault(session.id, h.pending)
        del self.unloaded[session.id]

    def _write_fresh(self, prompt: Prompt | None, caption: Caption | None, history: Tensor,
                     first_frame: int) -> list[StreamPages]:  # fmt: skip
        """New streams for a session (a row each), its `history` (1, C, N, h, w) written into them in one write,
        positioned at `first_frame`; nothing is held if it fails."""
        group = self._new_streams(prompt, first_frame)
        try:
            self._write([group], [caption], history, graphed=False)
        except BaseException:
            for st in group:
                self.pages.release(st)
            raise
        return group

    def set_prompt(self, session: Session, prompt: Prompt, recache: bool) -> None:
        """Condition the session on `prompt` from its next chunk on (the chunk in flight keeps the old one).
        `recache`: also rewrite the cached frames' K/V under the new prompt, in one write (else they keep the K/V
        they were written with, and only new frames are written under it). The guidance scale cannot change (it
        decides the session's rows)."""
        self._caption(prompt)  # refuses a prompt for a model without text
        if prompt.guided != (session.params.rows == 2):
            raise ValueError("a prompt switch keeps the session's guidance (on or off)")
        self.pending_prompts[session.id] = (prompt, recache)

    def _switch(self, g: GenerationState, prompt: Prompt, recache: bool) -> None:
        caption = self._caption(prompt)
        if recache:
            history = torch.cat(g.history, dim=2)[:, :, -self.max_cache_frames :]
            first = g.pages.num_written - history.shape[2]
            for st in g.streams():  # the K/V are rewritten from the kept latents: the old pages are not needed
                self.pages.release(st)
            group = self._write_fresh(prompt, caption, history, first)
            g.pages, g.uncond = group[-1], group[0] if len(group) == 2 else None
            g.history = [history]
        g.caption = caption

    def restore(self, session: Session, state: HostState) -> None:
        """Register a saved session (read back from disk) as unloaded: its next prefill rebuilds it."""
        self.unloaded[session.id] = state

    @torch.no_grad()
    def denoise(self, sessions: list[Session]) -> list[Session]:
        """One denoising step for every session (one batched forward; each at its own index and cache length).
        Returns the sessions whose chunk is now finished (ready for `decode_chunks`)."""
        with self.timer("step", rows_of(sessions)):  # the capacity model counts rows
            return self._denoise(sessions)

    def _denoise(self, sessions: list[Session]) -> list[Session]:
        dev = self.pipe.device
        gens = [self.states[s.id] for s in sessions]
        x = torch.cat([g.x for g in gens])
        # nothing in a step waits for the GPU: timesteps (one per row) go over asynchronously
        t = to_device(torch.tensor([g.timesteps[g.step] for g in gens for _ in g.streams()]), dev)
        streams, rows_x, y, mask = self._rows([g.streams() for g in gens], [g.caption for g in gens], x)
        out = self._guide(gens, self._denoise_forward(streams, rows_x, t, y, mask))
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
        with self.timer("write", rows_of(sessions)):
            clean = torch.cat([perturb_for_cache(g.x, g.sampler, self.perturb_t, g.generator) for g in gens])
            self._write([g.streams() for g in gens], [g.caption for g in gens], clean)
        for i, (s, g) in enumerate(zip(sessions, gens, strict=True)):
            g.remember(clean[i : i + 1], self.max_cache_frames)
            g.x, g.step = self._chunk_noise(g.generator), g.sampler.num_steps - 1
            g.x0_prev = _no_estimate(g.sampler, g.x)
            if (switch := self.pending_prompts.pop(s.id, None)) is not None:
                self._switch(g, *switch)

    def steps_left(self, session: Session) -> int:
        """Denoising steps left in the session's chunk in flight."""
        return self.states[session.id].step + 1

    def release(self, session: Session) -> None:
        """Give the session's pages back to the pool and drop its tensors (a no-op for a session never prefilled)."""
        self.unloaded.pop(session.id, None)
        self.pending_prompts.pop(session.id, None)
        g = self.states.pop(session.id, None)
        if g is not None:
            for st in g.streams():
                self.pages.release(st)

    @property
    def num_pages(self) -> int:
        """Temporal pages sessions can hold (the pool has one more: the scratch page of padded graph rows)."""
        return self.pages.temporal.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.pages.temporal.num_free
