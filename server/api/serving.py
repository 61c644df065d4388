"""How the app is served: uvicorn with the connection limits of the settings (`ca2vdm serve` and the tests' real
servers use this same config)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from .limits import RateLimitLogs, RedactKeys, header_timeout_protocol
from .settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    for name in ("uvicorn.access", "uvicorn.error", "ca2vdm.api", "ca2vdm.engine"):
        logger = logging.getLogger(name)
        for kind in (RedactKeys, RateLimitLogs):  # request paths may carry ?api_key=; floods must not flood the log
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=header_timeout_protocol(settings.header_timeout_s, getattr(app.state, "clients", None)),
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ws_per_message_deflate=False,  # media is compressed already: deflating it costs CPU for nothing
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )


@contextmanager
def serve_in_thread(pipe: Any, **settings: Any) -> Iterator[tuple[str, FastAPI]]:
    """A real server on a free loopback port, in a thread of this process (tests, benchmarks): yields its address
    and app (`app.state.engine` once started); stopped, gracefully, on exit."""
    from .app import create_app  # the app imports this module

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = Settings(port=port, **settings)
    app = create_app(config, pipeline=pipe)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # the engine warms up first (slow on a busy CPU)
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)
