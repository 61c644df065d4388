"""REST video jobs: POST/GET/DELETE /v1/videos (DESIGN.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from .jobs import JobRunner, JobStore
from .schemas import VideoRequest, build_params

router = APIRouter(prefix="/v1/videos")


def _store(request: Request) -> JobStore:
    return request.app.state.jobs


def _runner(request: Request) -> JobRunner:
    return request.app.state.job_runner


Store = Annotated[JobStore, Depends(_store)]
Runner = Annotated[JobRunner, Depends(_runner)]


def _job_or_404(store: JobStore, job_id: str):
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no video job {job_id!r}")
    return job


@router.post("", status_code=202)
async def create_video(body: VideoRequest, request: Request, store: Store, runner: Runner) -> JSONResponse:
    try:
        params = build_params(body.image, body.seed, body.sampler, body.steps, body.num_frames, "raw",
                              request.app.state.engine, request.app.state.settings)  # fmt: skip
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    job = store.create(params.num_frames or 0, params.seed, params.sampler, params.steps)
    runner.submit(job, params.image)
    return JSONResponse(job.to_json(), status_code=202)


@router.get("")
def list_videos(store: Store, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None) -> dict:
    jobs = store.list(limit, after)
    return {"object": "list", "data": [j.to_json() for j in jobs], "has_more": len(jobs) == limit}


@router.get("/{job_id}")
def get_video(job_id: str, store: Store) -> dict:
    return _job_or_404(store, job_id).to_json()


@router.get("/{job_id}/content")
def get_content(job_id: str, store: Store) -> FileResponse:
    job = _job_or_404(store, job_id)
    if job.status != "completed" or not store.path(job_id).is_file():
        raise HTTPException(409, f"video {job_id} is {job.status}, not completed")
    return FileResponse(store.path(job_id), media_type="video/mp4", filename=f"{job_id}.mp4")


@router.delete("/{job_id}")
async def delete_video(job_id: str, store: Store, runner: Runner) -> dict:
    _job_or_404(store, job_id)
    runner.cancel(job_id)
    store.delete(job_id)
    return {"id": job_id, "object": "video", "deleted": True}
