"""The OpenAPI document tells the truth: schemathesis, an independent property-based tester, generates requests from
/openapi.json against a real server (tiny model, small limits so that generated jobs are cheap) and runs every check
(server errors, undocumented statuses, response bodies and content types against their schemas, schema-valid requests
accepted and invalid ones refused, 405 with Allow for undeclared methods, auth ignored or not, use after delete...).
Fixed seed, bounded examples: the same cases every run. Once without an API key and once with one (the bearer scheme
and its 401s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import running_server

ROOT = Path(__file__).resolve().parents[2]
KEY = "fuzz-key"
LIMITS = {"max_frames": 9, "max_steps": 2, "max_image_bytes": 4096, "max_queued_jobs": 10_000,
          "max_running_jobs": 2, "max_sessions_per_client": 0}  # fmt: skip


def fuzz(address: str, tmp: Path, headers: list[str], max_examples: int) -> tuple[str, int, int]:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"http://{address}/openapi.json", "--checks", "all",
           "--seed", "7", "--max-examples", str(max_examples), "--workers", "1", "--generation-deterministic",
           "--no-color", "--request-timeout", "20", "--report-dir", str(tmp)]  # fmt: skip
    for h in headers:
        cmd += ["-H", h]
    # real images in schema-valid cases; run from a scratch directory (schemathesis keeps a cache where it runs)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.fuzz_hooks",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp, env=env)
    out = result.stdout + result.stderr
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", out))
    return out, result.returncode, cases


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "api-key"])
def test_schemathesis_finds_no_failure(tiny_pipe, tmp_path, keyed):
    settings = dict(LIMITS)
    headers: list[str] = []
    if keyed:
        settings.update(api_key=KEY, public_docs=True)  # the document is public; the API behind it is not
        headers = [f"Authorization: Bearer {KEY}"]
    with running_server(tiny_pipe, **settings) as address:
        doc = httpx.get(f"http://{address}/openapi.json").json()
        assert ("securitySchemes" in doc.get("components", {})) == keyed
        out, code, cases = fuzz(address, tmp_path, headers, max_examples=60)
    assert code == 0, out[-12000:]
    assert cases >= 500, out[-3000:]
