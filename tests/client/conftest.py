"""Real servers on loopback (tiny model) for the client tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.conftest import running_server

try:  # the session fixture lives in tests/conftest.py; older trees had it in tests/api/conftest.py
    from tests.api.conftest import tiny_pipe  # noqa: F401
except ImportError:
    pass

API_KEY = "s3cret"


@pytest.fixture(scope="module")
def server(tiny_pipe) -> Iterator[str]:  # noqa: F811
    with running_server(tiny_pipe, max_sessions=4, max_batch=4, start_timeout_s=2.0) as address:
        yield address


@pytest.fixture(scope="module")
def keyed_server(tiny_pipe) -> Iterator[str]:  # noqa: F811
    with running_server(tiny_pipe, api_key=API_KEY, start_timeout_s=2.0) as address:
        yield address
