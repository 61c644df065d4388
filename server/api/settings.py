"""Server settings: every field is a CA2VDM_<NAME> environment variable; the common ones are also `ca2vdm serve` flags.
List settings take comma-separated values in the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ca2vdm.server.engine.config import EngineConfig

Origins = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CA2VDM_", extra="ignore")

    # the model
    model: str | None = None  # model spec (DESIGN.md); None: the packaged default model
    preset: str | None = None
    vae: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp8 (the block linears in float8; see docs/engine.md)
    text_encoder: str | None = None  # text-conditioned models: a local T5 directory (transformers' layout)
    text_encoder_device: str = "auto"  # auto (the model's device) | cpu | cuda
    prompt_cache_size: int = Field(1024, ge=0)  # prompts whose encoded features are kept (LRU; 0: none)
    # network and storage
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("ca2vdm-data")
    # access
    api_key: SecretStr | None = None
    api_key_file: Path | None = None  # read the key from this file (not visible in `ps`, unlike --api-key)
    allowed_origins: Origins = []  # websocket Origins allowed besides the server's own and loopback pages
    cors_origins: Origins = []  # origins that may call the REST API from a browser (CORS); none by default
    public_docs: bool = False  # /docs and /openapi.json without the key when one is set
    # engine (EngineConfig)
    max_sessions: int = Field(16, ge=1)  # sessions holding cache pages at once
    max_batch: int = Field(16, ge=1)  # sessions per denoising forward
    max_waiting: int = Field(64, ge=0)  # queued beyond max_sessions, per class; more are refused (server busy)
    max_background_sessions: int = Field(8, ge=1)  # jobs and max-pace streams admitted at once
    max_background_step_s: float = Field(0.15, gt=0)  # a step of background rows alone lasts at most this
    max_pending_clips: int = Field(3, ge=1)  # clips a client may leave unacknowledged before its session pauses
    max_pending_bytes: int = Field(32 * 2**20, ge=1)  # the same budget in encoded bytes
    max_paused_s: float = Field(30.0, gt=0)  # a session paused that long for its client is ended (slow_consumer)
    evict_paused_s: float = Field(5.0, gt=0)  # ... after that long when another session waits for a slot
    max_lead_s: float = Field(4.0, gt=0)  # a live session this far ahead of its viewer waits
    deadline_margin_s: float = Field(0.25, ge=0)  # a live clip counts as due this long before its viewer needs it
    realtime_target: float = Field(0.9, gt=0, le=1)  # share of measured throughput promised to live sessions
    admission_wait_s: float = Field(10.0, gt=0)  # a live session without real-time capacity that long: server_busy
    encode_workers: int = Field(2, ge=1)  # threads encoding clips off the engine thread
    cuda_graphs: bool = True  # replay the denoising forward and the cache write as CUDA graphs (CUDA only)
    compile_decoder: bool = True  # torch.compile the SD-VAE decoder at warm-up (CUDA only; about 50 s, 2x faster)
    # resuming (a stream whose connection dropped)
    resume_grace_s: float = Field(30.0, ge=0)  # a detached session keeps its cache pages this long (exact resume)
    max_detached_sessions: int = Field(8, ge=0)  # detached sessions holding pages at once (oldest unloaded first)
    resume_keep_s: float = Field(900.0, ge=0)  # an unloaded session stays resumable (rebuilt cache) this long
    max_resumable_sessions: int = Field(256, ge=0)  # unloaded sessions kept, in memory and across restarts
    max_resumable_bytes: int = Field(2**30, ge=0)  # ... and the host memory they may hold (oldest dropped first)
    # requests
    max_frames: int = Field(100_000, ge=1)  # per request; a stream with num_frames null ends there too
    max_steps: int = Field(1000, ge=1)
    max_image_bytes: int = Field(8 * 2**20, ge=1)  # encoded condition image
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # from the image header, before decoding
    max_image_aspect: float = Field(16.0, ge=1)  # long side / short side, from the header
    max_message_bytes: int = Field(12 * 2**20, ge=1024)  # websocket messages (a start with a base64 image)
    max_body_bytes: int = Field(12 * 2**20, ge=1024)  # HTTP request bodies, enforced while reading
    max_control_bytes: int = Field(16384, ge=256)  # websocket messages after start (stop, ack, prompt)
    max_control_rate: float = Field(50.0, gt=0)  # websocket messages per second after start (burst: twice that)
    min_prompt_interval_s: float = Field(1.0, ge=0)  # a stream changes its prompt at most once per this (text models)
    request_workers: int = Field(2, ge=1)  # threads that parse large requests and decode images
    max_pending_requests: int = Field(8, ge=1)  # large requests in or waiting for those threads; more: busy
    max_sessions_per_client: int = Field(8, ge=0)  # streams one client address may hold (0: no limit)
    max_invalid_requests: int = Field(20, ge=0)  # invalid requests per minute from one address before it is shut out
    invalid_ban_s: float = Field(60.0, gt=0)  # ... for this long (0 requests: never)
    max_connections_per_s: float = Field(10.0, ge=0)  # new connections per second from one address (0: no limit)
    # jobs
    max_queued_jobs: int = Field(64, ge=1)  # queued or running; more get 429
    max_running_jobs: int = Field(4, ge=1)  # at once (each a background session)
    max_job_attempts: int = Field(3, ge=1)  # runs a job may be interrupted in before it is failed
    job_store_url: str | None = None  # postgresql://... : jobs shared by a cluster's nodes; None: SQLite in data_dir
    object_store_url: str | None = None  # s3://bucket/prefix or a shared directory: the jobs' files; None: data_dir
    job_lease_s: float = Field(15.0, gt=0)  # a cluster job whose worker has not heartbeated for this long is requeued
    # connections
    start_timeout_s: float = Field(10.0, gt=0)  # a websocket must send `start` within this
    header_timeout_s: float = Field(10.0, gt=0)  # an HTTP request's headers must arrive within this
    body_timeout_s: float = Field(30.0, gt=0)  # and each part of its body within this
    ws_ping_interval_s: float = Field(5.0, gt=0)  # websocket keepalive pings; a client that does not answer ...
    ws_ping_timeout_s: float = Field(10.0, gt=0)  # ... within this (it stopped reading) is disconnected
    max_connections: int = Field(1000, ge=1)  # open connections; more get 503

    @field_validator("allowed_origins", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip().rstrip("/") for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read the API key file: {exc}") from exc
            if not key:
                raise ValueError(f"the API key file {self.api_key_file} is empty")
            self.api_key = SecretStr(key)
        return self

    def engine_config(self) -> EngineConfig:
        names = [n for n in EngineConfig.__dataclass_fields__ if n in type(self).model_fields]
        resume_dir = str(self.data_dir / "sessions")  # resumable sessions across a graceful restart
        return EngineConfig(**{n: getattr(self, n) for n in names}, resume_dir=resume_dir)
