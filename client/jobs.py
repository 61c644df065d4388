"""Sync client of the REST video jobs (`/v1/videos`, DESIGN.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ._util import auth_headers, encode_image, http_base, open_part
from .errors import ApiError, JobFailed, JobTimeout, TransportError

__all__ = ["JobsClient"]

Job = dict[str, Any]
_FINAL = ("completed", "failed", "cancelled")


class JobsClient:
    """Submits, polls, downloads and deletes video jobs. `url`: http[s]://, ws[s]:// or host:port."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = http_base(url)
        self._http = httpx.Client(
            base_url=self.url, headers=auth_headers(api_key), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        num_frames: int,
        image: bytes | str | Path | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        prompt: str | None = None,
        guidance_scale: float | None = None,
    ) -> Job:
        """Queue a job of `num_frames` frames (image: PNG/JPEG bytes or a path; prompt and guidance_scale:
        text-conditioned models); returns the new job."""
        body: dict[str, Any] = {"num_frames": num_frames}
        if image is not None:
            body["image"] = encode_image(image)
        for key, value in (("seed", seed), ("sampler", sampler), ("steps", steps), ("prompt", prompt),
                           ("guidance_scale", guidance_scale)):  # fmt: skip
            if value is not None:
                body[key] = value
        return self._json("POST", "/v1/videos", json=body)

    def get(self, job_id: str) -> Job:
        return self._json("GET", f"/v1/videos/{job_id}")

    def list(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """One page, newest first: `{"object": "list", "data": [job...], "has_more": bool}`."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._json("GET", "/v1/videos", params=params)

    def wait(
        self,
        job_id: str,
        timeout: float | None = 600.0,
        poll: float = 0.5,
        on_progress: Callable[[Job], object] | None = None,
    ) -> Job:
        """Poll until the job is completed and return it. Raises JobFailed (failed/cancelled) or JobTimeout.

        `on_progress(job)` is called with the first state and whenever status or progress changes.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, Any] | None = None
        while True:
            job = self.get(job_id)
            if on_progress is not None and (job.get("status"), job.get("progress")) != seen:
                seen = (job.get("status"), job.get("progress"))
                on_progress(job)
            if job.get("status") == "completed":
                return job
            if job.get("status") in _FINAL:
                raise JobFailed(job)
            if deadline is not None and time.monotonic() + poll > deadline:
                raise JobTimeout(job, timeout or 0.0)
            time.sleep(poll)

    def download(self, job_id: str, path: str | Path) -> Path:
        """Save the job's MP4 to `path` (a directory gets `<id>.mp4`); written to a temp file, then renamed."""
        path = Path(path)
        if path.is_dir():
            path = path / f"{job_id}.mp4"
        tmp, file = open_part(path)
        try:
            with file as out:
                try:
                    with self._http.stream("GET", f"/v1/videos/{job_id}/content") as response:
                        if response.status_code >= 400:
                            response.read()
                            raise _api_error(response)
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                except httpx.TransportError as exc:
                    raise TransportError(f"cannot reach {self.url}: {exc}") from exc
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def delete(self, job_id: str) -> dict[str, Any]:
        """Cancel the job if it runs, and delete it and its file."""
        return self._json("DELETE", f"/v1/videos/{job_id}")

    def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _api_error(response)
        return response.json()


def _api_error(response: httpx.Response) -> ApiError:
    """ApiError from `{"error": {"code", "message"}}`, or from the status line when the body is not that."""
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, f"http_{response.status_code}", text)
