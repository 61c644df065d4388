"""The engine's knobs, in one frozen config (the server builds it from its settings: `Settings.engine_config`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 16  # admitted (holding cache pages) at once; sizes the page pool
    max_batch: int = 16  # sessions per denoising forward
    max_waiting: int = 64  # queued for admission; more are refused (server busy)
    max_pending_clips: int = 2  # a consumer further behind pauses its session
    encode_workers: int = 2  # threads encoding clips (fMP4, JPEG) off the engine thread
    cuda_graphs: bool = True  # replay the forwards as CUDA graphs (on CUDA devices)

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_batch, self.max_pending_clips, self.encode_workers) < 1:
            raise ValueError("max_sessions, max_batch, max_pending_clips and encode_workers must be >= 1")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
