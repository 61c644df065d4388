"""Throwaway services for the cluster's job tests: a PostgreSQL server from Debian's binaries and moto's S3 server.

PostgreSQL refuses to run as root (CI runs as root): its data directory then belongs to the `postgres` system user
(or `nobody`) and initdb and postgres run as that user (`runuser`). It listens on a unix socket in its own temporary
directory only (no port to collide with), trusts local connections, and skips fsync (nothing here must survive).
Missing binaries skip the tests, unless CA2VDM_REQUIRE_POSTGRES is set (CI): then they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb (Debian's layout), or one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def new_database(url: str) -> str:
    """A fresh, empty database on the server of `url` (tests do not see each other's jobs); returns its URL."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
    return url.replace("/postgres?", f"/{name}?", 1)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    bindir = _postgres_bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
        if os.environ.get("CA2VDM_REQUIRE_POSTGRES"):
            pytest.fail(f"{reason}, and CA2VDM_REQUIRE_POSTGRES is set")
        pytest.skip(reason)
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="ca2vdm-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    if os.geteuid() == 0:
        user = next(u for u in ("postgres", "nobody") if _user_exists(u))
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    data, logfile = root / "data", root / "server.log"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)  # fmt: skip
    # in the foreground, a child of this process (pg_ctl would detach it): a test run that is killed takes it along
    command = [*as_user, str(bindir / "postgres"), "-D", str(data), "-h", "", "-k", str(root), "-F",
               "-c", "max_connections=200"]  # fmt: skip
    with open(logfile, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"postgresql://postgres@/postgres?host={root}"
    try:
        _wait_until_ready(url, server, logfile)
        yield url
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.exists():  # SIGQUIT to the postmaster itself: immediate shutdown
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_ready(url: str, server: subprocess.Popen, logfile: Path, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start:\n{logfile.read_text()}")
            time.sleep(0.05)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    """moto's S3 server on a free loopback port; the standard AWS variables point boto3 at it (dummy keys)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                env.delenv(name, raising=False)
            yield "s3://ca2vdm-test/jobs"
    finally:
        server.stop()
