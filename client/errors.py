"""Exceptions raised by the client. Every one is a `ClientError`."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of the client's errors."""


class TransportError(ClientError):
    """The server could not be reached, or the connection failed below the API (refused, timeout, bad handshake)."""


class StreamError(ClientError):
    """A `/v1/stream` error: the server's `error` message (or a broken stream) and the websocket close code."""

    def __init__(self, code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.close_code = code, message, close_code


class ApiError(ClientError):
    """A REST error response: HTTP status and the server's `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status, self.code, self.message = status, code, message


class JobFailed(ClientError):
    """A waited-for video job ended `failed` or `cancelled`; `job` is its last state."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.status: str = job.get("status", "failed")
        self.error: str | None = job.get("error")
        super().__init__(f"job {job.get('id')} {self.status}" + (f": {self.error}" if self.error else ""))


class JobTimeout(ClientError, TimeoutError):
    """`JobsClient.wait` gave up before the job finished; `job` is its last state."""

    def __init__(self, job: dict[str, Any], timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.get('id')} still {job.get('status')} after {timeout:g} s")
