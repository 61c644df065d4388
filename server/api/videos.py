"""REST video jobs: POST/GET/DELETE /v1/videos (DESIGN.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .job_runner import JobRunner
from .jobs import JOB_ID_PATTERN, JobQueueFull, JobStore
from .openapi import Deleted, VideoJob, VideoList, errors
from .requests import Reject, RequestDecoder

router = APIRouter(prefix="/v1/videos")

RETRY_AFTER_S = 10  # what a 429 or 503 tells a client to wait


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


# The body is read as bytes (the size limit is BodyLimit's) and parsed by the RequestDecoder, off the event loop
# when large; its schema (with this server's limits) goes into the OpenAPI document (`openapi.document`).
@router.post("", status_code=202, response_model=VideoJob, responses=errors(400, 408, 413, 422, 429, 503))
async def create_video(request: Request, store: Store, runner: Runner) -> JSONResponse:
    decoder: RequestDecoder = request.app.state.decoder
    try:
        runner.check_room()  # before any parsing: a full queue costs nothing
        params = await decoder.job_params(await request.body())
        runner.check_room()
    except JobQueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    except Reject as exc:
        if exc.code == "invalid_request":
            request.app.state.clients.strike(request.client.host if request.client else "unknown")
        busy = exc.code == "server_busy"
        headers = {"Retry-After": str(RETRY_AFTER_S)} if busy else None
        raise HTTPException(503 if busy else exc.status, str(exc), headers=headers) from exc
    assert params.num_frames is not None
    prompt = params.prompt
    job = store.create(
        params.num_frames,
        params.seed,
        params.sampler,
        params.steps,
        params.image,
        prompt=prompt.text if prompt else None,
        guidance_scale=prompt.guidance_scale if prompt else None,
    )
    runner.submit(job, params.image)
    return JSONResponse(job.to_json(), status_code=202)


@router.get("", response_model=VideoList, responses=errors(400))
def list_videos(store: Store, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None) -> dict:  # fmt: skip
    try:
        jobs, has_more = store.list(limit, after)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"object": "list", "data": [j.to_json() for j in jobs], "has_more": has_more}


@router.get("/{job_id}", response_model=VideoJob, responses=errors(404))
def get_video(job_id: str, store: Store) -> dict:
    return _job_or_404(store, job_id).to_json()


@router.get("/{job_id}/content", response_class=FileResponse, responses={
    200: {"description": "The video", "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
    **errors(404, 409)})  # fmt: skip
def get_content(job_id: str, store: Store, request: Request) -> Response:
    job = _job_or_404(store, job_id)
    # the store's response: a local file, or a stream from a cluster's object store (server/cluster/pg_jobs.py)
    response = store.content_response(job_id, request.headers.get("range")) if job.status == "completed" else None
    if response is None:
        raise HTTPException(409, f"video {job_id} is {job.status}, not completed")
    return response


@router.delete("/{job_id}", response_model=Deleted, responses=errors(404))
async def delete_video(job_id: str, store: Store, runner: Runner) -> dict:
    _job_or_404(store, job_id)
    runner.cancel(job_id)
    store.delete(job_id)  # with the file, in one transaction with the job's completion: no file survives it
    return {"id": job_id, "object": "video", "deleted": True}
