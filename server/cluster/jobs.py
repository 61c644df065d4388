"""REST jobs in a cluster: the shared store (PostgreSQL rows, MP4s in S3 or on a shared disk) as the ingress and the
engine replicas each open it. Imported only where jobs are shared (psycopg, boto3)."""

from __future__ import annotations

from typing import Any

from ca2vdm.server.engine.engine import Engine

from .job_worker import JobWorker
from .objects import objects_from_url
from .pg_jobs import ClusterJobs, PgJobStore


def open_store(config: dict[str, Any]) -> PgJobStore:
    """`config`: app.shared_jobs(settings). MP4s go to `object_store_url`, else to the data directory (which must
    then be a disk every node shares)."""
    objects = objects_from_url(config["object_store_url"] or config["data_dir"])
    return PgJobStore(config["job_store_url"], objects, max_attempts=config["max_attempts"], lease_s=config["lease_s"])


def ingress_jobs(config: dict[str, Any]) -> tuple[PgJobStore, ClusterJobs]:
    """What the REST routes use on an ingress: the store, and the queue bound over the whole cluster."""
    store = open_store(config)
    return store, ClusterJobs(store, config["max_queued"])


async def start_worker(config: dict[str, Any], engine: Engine, replica: str) -> JobWorker:
    """A replica's worker: claims queued jobs while it has room and runs them on `engine`; heartbeats a fifth of
    the lease."""
    lease = config["lease_s"]
    worker = JobWorker(open_store(config), engine, replica, config["max_running"], heartbeat_s=lease / 5,
                       lease_s=lease)  # fmt: skip
    await worker.start()
    return worker
