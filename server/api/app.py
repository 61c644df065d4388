"""The FastAPI application: streaming, jobs, health, model info, metrics, docs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from ca2vdm.client.protocol import AckMessage, PromptMessage, StopMessage, message_schemas
from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.model.diffusion import SAMPLERS
from ca2vdm.server.model.loader import Pipeline, load_pipeline

from . import stream, videos
from .auth import key_is_valid
from .clients import ClientGuard
from .job_runner import JobRunner
from .jobs import JobStore
from .limits import BodyLimit
from .metrics import metrics_text
from .openapi import ERROR_CODES, Health, ModelInfo, Readiness, document
from .requests import RequestDecoder
from .schemas import RequestModels, request_models
from .settings import Settings

log = logging.getLogger("ca2vdm.api")
STATIC_DIR = Path(__file__).resolve().parent / "static"
PROMETHEUS_TEXT = "text/plain; version=0.0.4"


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """The methods the routes of this request's path accept (RFC 9110: a 405 lists them in Allow)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


Services = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def local_services(settings: Settings, pipeline: Pipeline | None = None) -> Services:
    """The single server's: an engine in this process, jobs in SQLite under the data directory. `pipeline` is
    loaded from `settings` when not given (tests pass a small one)."""

    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[None]:
        pipe = pipeline or load_pipeline(settings.model, preset=settings.preset, vae=settings.vae,
                                         device=settings.device, precision=settings.precision,
                                         text_encoder=settings.text_encoder,
                                         text_device=settings.text_encoder_device,
                                         text_cache_size=settings.prompt_cache_size)  # fmt: skip
        engine = Engine(pipe, settings.engine_config()).start()  # warm-up included: /readyz turns 200 after this
        app.state.engine = engine
        app.state.decoder = RequestDecoder(settings, pipe)
        app.state.jobs = JobStore(settings.data_dir, settings.max_job_attempts)
        app.state.job_runner = JobRunner(app.state.jobs, engine, settings.max_queued_jobs, settings.max_running_jobs,
                                         prompt=app.state.decoder.prompt)  # fmt: skip
        app.state.metrics = lambda: metrics_text(engine, app.state.jobs)
        app.state.job_runner.resume()
        log.info("model %s ready on %s: %dx%d at %d fps, real-time capacity %d sessions", pipe.name, pipe.device,
                 *pipe.frame_size[::-1], pipe.config.fps, engine.realtime_capacity())  # fmt: skip
        try:
            yield
        finally:
            await stop_front_end(app)
            engine.stop()

    return services


async def stop_front_end(app: FastAPI) -> None:
    """Stop what every kind of services starts beside its engine: the jobs (stopped ones stay queued), the store,
    the request decoder."""
    await app.state.job_runner.shutdown()
    app.state.jobs.close()
    app.state.decoder.close()


def create_app(settings: Settings, pipeline: Pipeline | None = None, services: Services | None = None) -> FastAPI:
    """The API over `services` (what fills app.state: engine, decoder, jobs, job_runner, metrics); the single
    server's by default (`local_services`), a cluster ingress's in server/cluster."""
    start_services = services or local_services(settings, pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with start_services(app):
            yield

    def require_key(request: Request) -> None:
        if not key_is_valid(settings, request.headers, request.query_params.get("api_key")):
            raise HTTPException(status_code=401, detail="missing or wrong API key",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    docs_open = settings.api_key is None or settings.public_docs
    app = FastAPI(title="ca2vdm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if docs_open else None)  # fmt: skip
    app.state.settings = settings
    app.state.clients = ClientGuard(settings.max_sessions_per_client, settings.max_invalid_requests,
                                    settings.invalid_ban_s, settings.max_connections_per_s)  # fmt: skip
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       guard=app.state.clients)  # fmt: skip
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.include_router(stream.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def player() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.include_router(videos.router, dependencies=[Depends(require_key)])

    if not docs_open:  # with a key: the schema and the docs page need it too

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
        def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        if not docs_open:
            require_key(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="ca2vdm API")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ERROR_CODES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path (Starlette names only the first route's)
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=headers or None)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"code": "invalid_request", "message": message}}, status_code=422)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "The engine died"}})
    def healthz(request: Request) -> JSONResponse:
        engine = getattr(request.app.state, "engine", None)
        ok = engine is None or engine.alive
        return JSONResponse({"status": "ok" if ok else "engine down"}, status_code=200 if ok else 503)

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready (loading, warming up, engine down)"}},
    )
    def readyz(request: Request) -> JSONResponse:
        engine = getattr(request.app.state, "engine", None)
        ready = engine is not None and engine.alive
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models", dependencies=[Depends(require_key)], response_model=ModelInfo)
    def models(request: Request) -> dict:
        engine: Engine = request.app.state.engine
        pipe = engine.pipe
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
            "schedules": pipe.config.recommended_schedules(),
            "text": pipe.config.takes_text,  # takes a prompt (start / POST /v1/videos `prompt`, the `prompt` message)
            "guidance_scale": pipe.config.guidance_scale if pipe.config.takes_text else None,
            "max_steps": settings.max_steps,
            "max_frames": settings.max_frames,
            "realtime_capacity_sessions": engine.realtime_capacity(),
        }

    @app.get("/metrics", dependencies=[Depends(require_key)], response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format 0.0.4",
                              "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}})  # fmt: skip
    async def metrics(request: Request) -> PlainTextResponse:
        text = request.app.state.metrics()
        if inspect.isawaitable(text):
            text = await text
        return PlainTextResponse(text, media_type=PROMETHEUS_TEXT)

    def served_models() -> RequestModels:
        """The request models of the model served (its decoder's, once the model is loaded; until then the
        settings' limits alone)."""
        decoder = getattr(app.state, "decoder", None)
        return decoder.models if decoder is not None else request_models(settings)

    @app.get("/v1/stream/messages", dependencies=[Depends(require_key)])
    def stream_messages() -> dict:
        """JSON Schemas of every message of the /v1/stream websocket, both directions, with this server's limits."""
        bounded = served_models()
        return message_schemas(client=(bounded.start, bounded.resume, StopMessage, AckMessage, PromptMessage))

    protected = {"/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/content", "/v1/models", "/metrics",
                 "/v1/stream/messages"}  # fmt: skip
    openapi_doc: dict = {}

    def openapi() -> dict:
        if not openapi_doc:
            models = served_models()
            doc = document(app, models, protected, keyed=settings.api_key is not None)
            if getattr(app.state, "decoder", None) is None:
                return doc  # before the model is loaded: not kept
            openapi_doc.update(doc)
        return openapi_doc

    app.openapi = openapi  # type: ignore[method-assign]

    return app
