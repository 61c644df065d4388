"""The FastAPI application: streaming, health, model info, metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.model.diffusion import SAMPLERS
from ca2vdm.server.model.loader import Pipeline, load_pipeline

from . import stream, videos
from .auth import key_is_valid
from .jobs import JobRunner, JobStore
from .metrics import metrics_text
from .settings import Settings

log = logging.getLogger("ca2vdm.api")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings, pipeline: Pipeline | None = None) -> FastAPI:
    """`pipeline` is loaded from `settings` when not given (tests pass a small one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipe = pipeline or load_pipeline(settings.model, preset=settings.preset, vae=settings.vae,
                                         device=settings.device, precision=settings.precision)  # fmt: skip
        engine = Engine(pipe, settings.engine_config()).start()  # warm-up included: /readyz turns 200 after this
        app.state.engine = engine
        app.state.jobs = JobStore(settings.data_dir)
        app.state.job_runner = JobRunner(app.state.jobs, engine)
        log.info("model %s ready on %s: %dx%d at %d fps", pipe.name, pipe.device, *pipe.frame_size[::-1],
                 pipe.config.fps)  # fmt: skip
        try:
            yield
        finally:
            await app.state.job_runner.shutdown()
            app.state.jobs.close()
            engine.stop()

    def require_key(request: Request) -> None:
        if not key_is_valid(settings, request.headers.get("authorization"), request.query_params.get("api_key")):
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    app = FastAPI(title="ca2vdm", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(stream.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def player() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.include_router(videos.router, dependencies=[Depends(require_key)])

    codes = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 409: "conflict", 503: "unavailable"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = codes.get(exc.status_code, "error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"code": "invalid_request", "message": message}}, status_code=422)

    @app.get("/healthz")
    def healthz(request: Request) -> JSONResponse:
        engine = getattr(request.app.state, "engine", None)
        ok = engine is None or engine.alive
        return JSONResponse({"status": "ok" if ok else "engine down"}, status_code=200 if ok else 503)

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        engine = getattr(request.app.state, "engine", None)
        ready = engine is not None and engine.alive
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    def models(request: Request) -> dict:
        pipe = request.app.state.engine.pipe
        height, width = pipe.frame_size
        return {
            "name": pipe.name,
            "width": width,
            "height": height,
            "fps": pipe.config.fps,
            "chunk_frames": pipe.config.chunk_frames,
            "max_cache_frames": pipe.config.max_cache_frames,
            "samplers": list(SAMPLERS),
            "default_sampler": pipe.config.default_sampler,
            "default_steps": pipe.config.default_steps,
            "max_steps": settings.max_steps,
            "max_frames": settings.max_frames,
        }

    @app.get("/metrics", dependencies=[Depends(require_key)])
    def metrics(request: Request) -> Response:
        return Response(metrics_text(request.app.state.engine), media_type="text/plain; version=0.0.4")

    return app
