"""Python client for the ca2vdm server: websocket streaming, REST video jobs and the `ca2vdm-client` CLI.

Imports nothing from `server` and needs neither torch nor numpy.
"""

from __future__ import annotations

from .errors import ApiError, ClientError, JobFailed, JobTimeout, StreamError, TransportError
from .jobs import JobsClient
from .stream import Clip, Done, Event, Ready, StreamClient

__all__ = [
    "ApiError",
    "ClientError",
    "Clip",
    "Done",
    "Event",
    "JobFailed",
    "JobTimeout",
    "JobsClient",
    "Ready",
    "StreamClient",
    "StreamError",
    "TransportError",
]
