"""A real uvicorn server on loopback with the tiny pixel model, per test module or per settings."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ca2vdm.server.api.serving import serve_in_thread

APPS: dict = {}  # address -> FastAPI app of the servers running in this process (tests reach the engine)


@contextmanager
def running_server(pipe, **overrides) -> Iterator[str]:
    overrides.setdefault("data_dir", tempfile.mkdtemp(prefix="ca2vdm-test-"))
    # tests open many connections and send many bad requests from one address: the per-address guards are off
    # unless a test turns them on (tests/e2e/test_hardening.py)
    overrides.setdefault("max_connections_per_s", 0)
    overrides.setdefault("max_invalid_requests", 0)
    with serve_in_thread(pipe, **overrides) as (address, app):
        APPS[address] = app
        try:
            yield address
        finally:
            APPS.pop(address, None)


@pytest.fixture(scope="module")
def server(tiny_pipe) -> Iterator[str]:
    with running_server(tiny_pipe, max_sessions=4, max_batch=4, start_timeout_s=1.0) as address:
        yield address
