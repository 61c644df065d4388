"""The engine's knobs, in one frozen config (the server builds it from its settings: `Settings.engine_config`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # memory and batching
    max_sessions: int = 16  # admitted (holding cache pages) at once, live and background; sizes the page pool
    max_batch: int = 16  # sessions per denoising forward
    max_waiting: int = 64  # queued for admission, per class (live, background); more are refused (server busy)
    max_background_sessions: int = 8  # background (pace "max": REST jobs, max-pace streams) admitted at once
    max_background_step_s: float = 0.15  # a step of background rows alone lasts at most this (by measurement)
    # consumers
    max_pending_clips: int = 3  # clips produced but not yet taken (acknowledged) before the session pauses
    max_pending_bytes: int = 32 * 2**20  # the same budget in encoded bytes
    max_paused_s: float = 30.0  # a session paused this long for its consumer is ended (slow_consumer)
    evict_paused_s: float = 5.0  # ... and after this long, when another session waits for its slot
    encode_workers: int = 2  # threads encoding clips (fMP4, JPEG) off the engine thread
    # real-time pacing (live sessions)
    max_lead_s: float = 4.0  # a live session this far ahead of its viewer waits
    deadline_margin_s: float = 0.25  # a clip counts as due this long before its viewer needs it
    realtime_target: float = 0.9  # share of the measured throughput admission may promise to live sessions
    admission_wait_s: float = 10.0  # a live session that finds no real-time capacity this long gets server_busy
    # resuming (sessions whose consumer's connection dropped)
    resume_grace_s: float = 30.0  # a detached session keeps its cache pages this long (an exact resume)
    max_detached_sessions: int = 8  # at most this many hold pages while detached (the oldest is unloaded first)
    resume_keep_s: float = 900.0  # an unloaded session stays resumable (rebuilt) this long
    max_resumable_sessions: int = 256  # at most this many unloaded sessions are kept (the oldest dropped first)
    max_resumable_bytes: int = 2**30  # ... holding at most this much host memory (kept latents, unsent clips)
    resume_dir: str | None = None  # resumable sessions are saved here at stop() and read back at start()
    # several engines (a cluster's replicas) share `resume_dir`: start() reads nothing back; a resume whose token
    # this engine does not know takes that session's saved file, if another engine left one (server/cluster)
    shared_resume_dir: bool = False
    id_prefix: str = ""  # session ids and resume tokens start with this (a cluster replica's id: routes a resume)
    cuda_graphs: bool = True  # replay the forwards as CUDA graphs (on CUDA devices)
    compile_decoder: bool = True  # compile the latent decoder (SD-VAE; on CUDA devices), at warm-up

    def __post_init__(self) -> None:
        counts = (self.max_sessions, self.max_batch, self.max_background_sessions, self.max_pending_clips,
                  self.max_pending_bytes, self.encode_workers)  # fmt: skip
        if min(counts) < 1:
            raise ValueError("max_sessions, max_batch, max_background_sessions, max_pending_clips, max_pending_bytes "
                             "and encode_workers must be >= 1")  # fmt: skip
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        times = (self.max_paused_s, self.evict_paused_s, self.max_lead_s, self.admission_wait_s,
                 self.max_background_step_s)  # fmt: skip
        if min(times) <= 0 or self.deadline_margin_s < 0:
            raise ValueError("max_paused_s, evict_paused_s, max_lead_s and admission_wait_s must be > 0")
        if min(self.max_detached_sessions, self.max_resumable_sessions, self.max_resumable_bytes) < 0:
            raise ValueError("max_detached_sessions, max_resumable_sessions and max_resumable_bytes must be >= 0")
        if self.resume_grace_s < 0 or self.resume_keep_s < 0:
            raise ValueError("resume_grace_s and resume_keep_s must be >= 0")
        if not 0 < self.realtime_target <= 1:
            raise ValueError("realtime_target must be in (0, 1]")
