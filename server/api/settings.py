"""Server settings: every field is a `ca2vdm serve` flag and a CA2VDM_<NAME> environment variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ca2vdm.server.engine.config import EngineConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CA2VDM_", extra="ignore")

    model: str | None = None  # model spec (DESIGN.md); None: the packaged default model
    preset: str | None = None
    vae: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp8 (the block linears in float8; see docs/engine.md)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("ca2vdm-data")
    api_key: SecretStr | None = None
    max_sessions: int = Field(16, ge=1)  # sessions holding cache pages at once
    max_batch: int = Field(16, ge=1)  # sessions per denoising forward
    max_waiting: int = Field(64, ge=0)  # queued beyond max_sessions; more are refused (server busy)
    max_pending_clips: int = Field(2, ge=1)  # clips a consumer may lag behind before its session pauses
    encode_workers: int = Field(2, ge=1)  # threads encoding clips off the engine thread
    cuda_graphs: bool = True  # replay the denoising forward and the cache write as CUDA graphs (CUDA only)
    max_frames: int = Field(100_000, ge=1)  # per request
    max_steps: int = Field(1000, ge=1)
    max_image_bytes: int = Field(16 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_message_bytes: int = Field(24 * 2**20, ge=1024)  # websocket text frames (base64 image included)
    start_timeout_s: float = Field(10.0, gt=0)  # a websocket must send `start` within this

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_sessions=self.max_sessions, max_batch=self.max_batch, max_waiting=self.max_waiting,
                            max_pending_clips=self.max_pending_clips, encode_workers=self.encode_workers,
                            cuda_graphs=self.cuda_graphs)  # fmt: skip
