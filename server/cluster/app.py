"""The Ray Serve application: `Ingress` (the public API, stateless) in front of `EngineReplica` (one per GPU).

`build(args)` is the application builder (`serve run ca2vdm.server.cluster.app:build key=value ...`, the config in
deploy/ray/serve.yaml, or `ca2vdm serve --ray`). Its arguments are the server's settings (the names of the
CA2VDM_* variables, lowercase) plus the cluster's own (`ClusterOptions`).

The ingress is the single server's FastAPI app (same routes, limits, player, OpenAPI document) over other services:
a `RemoteEngine` instead of an engine, the replicas' merged metrics, and jobs in the shared store. A client cannot
tell it from the single server, except that a stream whose replica leaves closes with 1012 (resume it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from ca2vdm.server.api.app import Services, create_app, stop_front_end
from ca2vdm.server.api.job_runner import JobRunner
from ca2vdm.server.api.jobs import JobStore
from ca2vdm.server.api.requests import RequestDecoder
from ca2vdm.server.api.settings import Settings

from .autoscale import RealtimePolicy
from .metrics import cluster_metrics
from .remote import ENGINE_DEPLOYMENT, RemoteEngine
from .replica import EngineReplica
from .router import SessionRouter


class ClusterOptions(BaseModel):
    """How the application is laid out (everything else in the builder's arguments is a server setting)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=1)  # a fixed number of engine replicas (default: 1, or autoscaling)
    min_replicas: int | None = Field(None, ge=0)  # autoscaling on live sessions vs real-time capacity ...
    max_replicas: int | None = Field(None, ge=1)  # ... between these
    target_utilization: float = Field(0.8, gt=0, le=1)  # share of real-time capacity autoscaling aims to fill
    downscale_periods: int = Field(30, ge=1)  # control periods (~1 s) of low load before a replica leaves
    gpus_per_replica: float = Field(1.0, ge=0)  # Ray resources of an engine replica
    cpus_per_replica: float = Field(1.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads of an engine replica (CPU engines)
    ingress_replicas: int = Field(1, ge=1)
    session_dir: str | None = None  # shared by every replica: a leaving replica's sessions are resumed elsewhere
    max_streams_per_replica: int = Field(1024, ge=1)  # Serve's max_ongoing_requests (streams are long requests)
    graceful_shutdown_timeout_s: float = Field(60.0, gt=0)  # a leaving replica's streams end or move by then

    @model_validator(mode="after")
    def _check(self) -> ClusterOptions:
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise ValueError("give either replicas or min_replicas/max_replicas")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:  # type: ignore[operator]
            raise ValueError("min_replicas > max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


def split_args(args: dict[str, Any]) -> tuple[ClusterOptions, dict[str, Any]]:
    """The builder's arguments -> (cluster options, server settings); unknown names are an error."""
    cluster_names = set(ClusterOptions.model_fields)
    settings = {k: v for k, v in args.items() if k not in cluster_names}
    unknown = sorted(set(settings) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}: server settings or {sorted(cluster_names)}")
    Settings(**settings)  # fail here, at build time, not in every replica
    return ClusterOptions(**{k: v for k, v in args.items() if k in cluster_names}), settings


def shared_jobs(settings: Settings) -> dict[str, Any] | None:
    """The shared job store's configuration, or None (jobs in the ingress's SQLite store)."""
    if settings.job_store_url is None:
        return None
    return {"job_store_url": settings.job_store_url, "object_store_url": settings.object_store_url,
            "data_dir": str(settings.data_dir), "max_attempts": settings.max_job_attempts,
            "lease_s": settings.job_lease_s, "max_running": settings.max_running_jobs,
            "max_queued": settings.max_queued_jobs}  # fmt: skip


def cluster_services(settings: Settings, engine_handle: Any, jobs: dict[str, Any] | None) -> Services:
    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[None]:
        engine = await RemoteEngine(
            engine_handle, max_waiting=settings.max_waiting, admission_wait_s=settings.admission_wait_s
        ).connect()
        app.state.engine = engine
        app.state.decoder = RequestDecoder(settings, engine.pipe, encode=engine.encode_prompt)  # type: ignore[arg-type]
        if jobs is not None:
            from .jobs import ingress_jobs  # psycopg and boto3 only where jobs are shared

            app.state.jobs, app.state.job_runner = ingress_jobs(jobs)
        else:  # one ingress: its own SQLite store, the jobs run on the replicas through it
            app.state.jobs = JobStore(settings.data_dir, settings.max_job_attempts)
            app.state.job_runner = JobRunner(app.state.jobs, engine, settings.max_queued_jobs,  # type: ignore[arg-type]
                                             settings.max_running_jobs, prompt=app.state.decoder.prompt)  # fmt: skip
        app.state.metrics = lambda: cluster_metrics(engine, app.state.jobs)
        app.state.job_runner.resume()
        try:
            yield
        finally:
            await stop_front_end(app)

    return services


@serve.ingress()
class Ingress:
    def __init__(self, engine: Any, settings: dict[str, Any], jobs: dict[str, Any] | None) -> None:
        self._engine, self._settings, self._jobs = engine, settings, jobs

    def __serve_build_asgi_app__(self) -> FastAPI:
        settings = Settings(**self._settings)
        return create_app(settings, services=cluster_services(settings, self._engine, self._jobs))


def build(args: dict[str, Any]) -> Any:
    """The application (Serve's builder signature: a dict of arguments)."""
    options, settings = split_args(dict(args))
    parsed = Settings(**settings)
    jobs = shared_jobs(parsed)
    if jobs is None and options.ingress_replicas > 1:
        raise ValueError("several ingress replicas need a shared job store (job_store_url)")
    scaling: dict[str, Any] = {"num_replicas": options.replicas or 1}
    if options.autoscaling:
        policy = AutoscalingPolicy(policy_function=RealtimePolicy,
                                   policy_kwargs={"target_utilization": options.target_utilization,
                                                  "downscale_periods": options.downscale_periods})  # fmt: skip
        scaling = {"num_replicas": "auto", "autoscaling_config": AutoscalingConfig(
            min_replicas=options.min_replicas, max_replicas=options.max_replicas, initial_replicas=options.min_replicas
            or 1, policy=policy, upscale_delay_s=0, downscale_delay_s=0, metrics_interval_s=1,
            look_back_period_s=5)}  # fmt: skip
    engine = serve.deployment(EngineReplica).options(
        name=ENGINE_DEPLOYMENT,
        ray_actor_options={"num_gpus": options.gpus_per_replica, "num_cpus": options.cpus_per_replica},
        max_ongoing_requests=options.max_streams_per_replica,
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
        health_check_period_s=5,
        request_router_config=RequestRouterConfig(
            request_router_class=SessionRouter, request_routing_stats_period_s=1.0
        ),  # fmt: skip
        **scaling,
    )
    ingress = serve.deployment(Ingress).options(
        name="Ingress", num_replicas=options.ingress_replicas, max_ongoing_requests=options.max_streams_per_replica,
        ray_actor_options={"num_cpus": 0.5})  # fmt: skip
    replica_args = {"settings": settings, "session_dir": options.session_dir, "torch_threads": options.torch_threads,
                    "jobs": jobs}  # fmt: skip
    return ingress.bind(engine.bind(**replica_args), settings, jobs)
