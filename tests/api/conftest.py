"""A real uvicorn server on loopback with the tiny pixel model, per test module or per settings."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from ca2vdm.server.api.app import create_app
from ca2vdm.server.api.serving import uvicorn_config
from ca2vdm.server.api.settings import Settings

APPS: dict = {}  # address -> FastAPI app of the servers running in this process (tests reach the engine)


@contextmanager
def running_server(pipe, **overrides) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides.setdefault("data_dir", tempfile.mkdtemp(prefix="ca2vdm-test-"))
    # tests open many connections and send many bad requests from one address: the per-address guards are off
    # unless a test turns them on (tests/e2e/test_hardening.py)
    overrides.setdefault("max_connections_per_s", 0)
    overrides.setdefault("max_invalid_requests", 0)
    settings = Settings(port=port, **overrides)
    app = create_app(settings, pipeline=pipe)
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    address = f"127.0.0.1:{port}"
    APPS[address] = app
    try:
        yield address
    finally:
        APPS.pop(address, None)
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_pipe) -> Iterator[str]:
    with running_server(tiny_pipe, max_sessions=4, max_batch=4, start_timeout_s=1.0) as address:
        yield address
