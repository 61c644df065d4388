"""The Ray Serve deployment (deploy/ray) holds together, without docker, Kubernetes or a network: the Serve config and
the KubeRay manifest's serveConfigV2 validate against Ray's own schema and name the app builder, servectl.py renders
the environment's overrides as documented, the compose file's services, mounts, variables and dependencies are
sane, Prometheus scrapes services that exist, and the Grafana dashboard's "Replicas" row reads real metrics by
replica. (hadolint on the Dockerfile: tests/deploy/test_deploy.py::test_hadolint.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from ca2vdm.server.api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RAY = ROOT / "deploy" / "ray"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ca2vdm.json"
IMPORT_PATH = "ca2vdm.server.cluster.app:build"
# the builder's own arguments (the rest are server settings by name)
CLUSTER_ARGS = {"job_store_url", "object_store_url", "session_dir", "replicas", "min_replicas", "max_replicas",
                "gpus_per_replica", "ingress_replicas"}  # fmt: skip
REPLICA_ARGS = {"replicas", "min_replicas", "max_replicas"}
# compose variables that must come from the operator's environment, never from a default
SECRETS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN"}


def load_servectl():
    spec = importlib.util.spec_from_file_location("servectl", RAY / "servectl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


servectl = load_servectl()


def serve_schema():
    return pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed").ServeDeploySchema


def serve_config() -> dict:
    return yaml.safe_load((RAY / "serve.yaml").read_text())


def app_of(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def compose() -> dict:
    return yaml.safe_load((RAY / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    """A compose string with each ${VAR:-default} replaced by its default (${VAR:?...} by a placeholder)."""
    value = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "SECRET", value)
    return value.replace("$$", "$")


def kuberay() -> list[dict]:
    return [d for d in yaml.safe_load_all((RAY / "kuberay-rayservice.yaml").read_text()) if d]


def rayservice() -> dict:
    (rs,) = [d for d in kuberay() if d["kind"] == "RayService"]
    return rs


def allowed_args() -> set[str]:
    return set(Settings.model_fields) | CLUSTER_ARGS


# ---- the Serve config -------------------------------------------------------------------------------------------


def check_app_config(config: dict) -> dict:
    schema = serve_schema().model_validate(config)
    (app,) = schema.applications
    assert app.name == "ca2vdm" and app.route_prefix == "/" and app.import_path == IMPORT_PATH
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    assert schema.http_options.request_timeout_s is None, "streams are long requests: no proxy timeout"
    args = app_of(config)["args"]
    assert set(args) <= allowed_args(), f"unknown builder arguments {set(args) - allowed_args()}"
    autoscaling = {"min_replicas", "max_replicas"} & set(args)
    assert ("replicas" in args) != bool(autoscaling), "either replicas or min_replicas/max_replicas"
    assert not autoscaling or autoscaling == {"min_replicas", "max_replicas"}
    assert "api_key" not in args, "secrets stay out of the config (Ray shows it on its dashboard)"
    job_store = urlparse(args["job_store_url"])
    assert job_store.scheme in {"postgresql", "postgres"} and job_store.password is None, "password: PGPASSWORD"
    assert urlparse(args["object_store_url"]).scheme == "s3"
    assert Path(args["session_dir"]).is_absolute()
    return args


def test_serve_config_validates_against_rays_schema():
    args = check_app_config(serve_config())
    assert args["replicas"] == 1 and args["gpus_per_replica"] == 1


def test_serve_config_documents_each_overridable_arg():
    text = (RAY / "serve.yaml").read_text()
    assert servectl.APP_NAME == "ca2vdm" and servectl.IMPORT_PATH == IMPORT_PATH
    assert set(servectl.OVERRIDABLE) <= allowed_args()
    for name in servectl.OVERRIDABLE:
        assert f"CA2VDM_{name.upper()}" in text, f"serve.yaml does not document CA2VDM_{name.upper()}"
    assert "CA2VDM_SERVE_ARGS" in text


# ---- servectl.py render ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "gpus", "expected"),
    [
        ({}, None, {"replicas": 1}),
        ({}, 4, {"replicas": 4}),  # one engine replica per visible GPU
        ({}, 0, {"replicas": 1}),
        ({"CA2VDM_GPUS_PER_REPLICA": "2"}, 4, {"replicas": 2, "gpus_per_replica": 2}),
        ({"CA2VDM_GPUS_PER_REPLICA": "0.5"}, 2, {"replicas": 4, "gpus_per_replica": 0.5}),
        ({"CA2VDM_REPLICAS": "3"}, 8, {"replicas": 3}),
        ({"CA2VDM_REPLICAS": ""}, 2, {"replicas": 2}),  # empty: unset
        ({"CA2VDM_MIN_REPLICAS": "1", "CA2VDM_MAX_REPLICAS": "6"}, 8, {"min_replicas": 1, "max_replicas": 6}),
        ({"CA2VDM_MAX_REPLICAS": "6"}, 8, {"min_replicas": 1, "max_replicas": 6}),
        ({"CA2VDM_MIN_REPLICAS": "2"}, 8, {"min_replicas": 2, "max_replicas": 8}),
        ({"CA2VDM_MODEL": "/models/m", "CA2VDM_MAX_SESSIONS": "24", "CA2VDM_DEVICE": ""}, None,
         {"model": "/models/m", "max_sessions": 24, "device": "cuda"}),
        ({"CA2VDM_SERVE_ARGS": '{"max_waiting": 32, "max_batch": 8}'}, None, {"max_waiting": 32, "max_batch": 8}),
        ({"CA2VDM_API_KEY_FILE": "/run/ca2vdm/api-key"}, None, {"api_key_file": "/run/ca2vdm/api-key"}),
        ({"CA2VDM_JOB_STORE_URL": "postgresql://u@db:5432/x"}, None, {"job_store_url": "postgresql://u@db:5432/x"}),
    ],
)  # fmt: skip
def test_render_applies_the_environment(environ, gpus, expected):
    config = serve_config()
    before = json.dumps(config, sort_keys=True)
    rendered = servectl.render(config, environ, gpus)
    assert json.dumps(config, sort_keys=True) == before, "render leaves its input alone"
    args = app_of(rendered)["args"]
    for key, value in expected.items():
        assert args[key] == value and type(args[key]) is type(value), (key, args.get(key))
    if REPLICA_ARGS & set(expected):
        assert REPLICA_ARGS & set(args) == REPLICA_ARGS & set(expected), "the other replica arguments are dropped"
    check_app_config(rendered)


@pytest.mark.parametrize(
    "environ",
    [
        {"CA2VDM_REPLICAS": "many"},
        {"CA2VDM_MIN_REPLICAS": "4", "CA2VDM_MAX_REPLICAS": "2"},
        {"CA2VDM_SERVE_ARGS": "max_waiting=3"},
        {"CA2VDM_SERVE_ARGS": "[1, 2]"},
        {"CA2VDM_GPUS_PER_REPLICA": "one"},
    ],
)
def test_render_refuses_bad_settings(environ):
    with pytest.raises(servectl.ConfigError):
        servectl.render(serve_config(), environ, 4)


def test_render_command_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CA2VDM_REPLICAS": "", "CA2VDM_MODEL": "random:tiny"}
    out = subprocess.run([sys.executable, str(RAY / "servectl.py"), "render", str(RAY / "serve.yaml"), "--gpus", "2"],
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    args = app_of(yaml.safe_load(out.stdout))["args"]
    assert args["replicas"] == 2 and args["model"] == "random:tiny"
    bad = subprocess.run([sys.executable, str(RAY / "servectl.py"), "render", str(RAY / "serve.yaml")],
                         env={**env, "CA2VDM_REPLICAS": "x"}, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "CA2VDM_REPLICAS" in bad.stderr


# ---- start.sh -------------------------------------------------------------------------------------------------------


def test_start_script():
    script = (RAY / "start.sh").read_text()
    assert subprocess.run(["bash", "-n", str(RAY / "start.sh")]).returncode == 0
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    if shellcheck is not None:
        result = subprocess.run([shellcheck, str(RAY / "start.sh")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    needs = ["nvidia-smi -L", "ray start --head", '--num-gpus="$gpus"', "--block", "serve deploy", "trap ",
             "RAY_AUTH_MODE=token", 'servectl.py" render', 'servectl.py" wait', 'servectl.py" drain']  # fmt: skip
    for needed in needs:
        assert needed in script, needed
    assert "CA2VDM_API_KEY_FILE" in script and "umask 077" in script, "the API key goes to a private file"


# ---- docker compose -------------------------------------------------------------------------------------------------


def test_compose_services_and_images():
    spec = compose()
    services = spec["services"]
    assert {"ray", "postgres", "minio", "minio-init", "prometheus", "grafana"} <= set(services)
    ray = services["ray"]
    context = (RAY / ray["build"]["context"]).resolve()
    assert context == ROOT and (context / ray["build"]["dockerfile"]).is_file()
    assert ray["image"] == "ca2vdm:latest"
    for name, service in services.items():
        if name == "ray":
            continue
        image = interpolate(service["image"])
        assert "build" not in service and re.fullmatch(r"[\w./-]+:[\w.-]+", image), (name, image)
        assert not image.endswith(":latest"), f"{name}: pin the image's tag"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert ray["command"] == ["bash", "/opt/ca2vdm/start.sh"]


def test_compose_mounts_exist():
    spec = compose()
    declared = set(spec["volumes"])
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source, target = interpolate(volume).split(":")[:2]
            if source.startswith("."):
                assert (RAY / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} mounts the undeclared volume {source}"
            assert target.startswith("/")
    ray_mounts = {
        interpolate(v).split(":")[1]: interpolate(v).split(":")[0] for v in spec["services"]["ray"]["volumes"]
    }
    # start.sh finds servectl.py and serve.yaml beside itself
    assert {ray_mounts[f"/opt/ca2vdm/{f}"] for f in ("start.sh", "servectl.py", "serve.yaml")} == {
        "./start.sh", "./servectl.py", "./serve.yaml"}  # fmt: skip
    assert "/models" in ray_mounts and "/data" in ray_mounts
    assert app_of(serve_config())["args"]["session_dir"] in ray_mounts, "session_dir is a volume"
    grafana = {
        interpolate(v).split(":")[1]: interpolate(v).split(":")[0] for v in spec["services"]["grafana"]["volumes"]
    }
    assert grafana["/etc/grafana/provisioning"] == "../grafana/provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == "../grafana/dashboards"


def test_compose_gpus_health_and_stop():
    ray = compose()["services"]["ray"]
    devices = ray["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    health = " ".join(ray["healthcheck"]["test"])
    assert "/readyz" in health and ":8000/" in health
    assert ray["restart"] == "unless-stopped" and ray["shm_size"]
    grace = int(ray["stop_grace_period"].rstrip("s"))
    drain = int(interpolate(ray["environment"]["CA2VDM_DRAIN_TIMEOUT_S"]))
    assert grace > drain, "docker must wait for start.sh's drain"
    depends = ray["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"
    services = compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):  # the short form: started
            depends = {d: {} for d in depends}
        for dep, how in depends.items():
            assert dep in services, f"{name} depends on the unknown service {dep}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"


def strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def test_compose_variables():
    spec = compose()
    text = "\n".join(strings(spec)).replace("$$", "")
    expressions = re.findall(r"\$\{([A-Z0-9_]+)(:-|:\?)?", text)
    assert expressions
    for name, how in expressions:
        if name in SECRETS:
            assert how == ":?", f"{name} is a secret: ${{{name}:?...}}, never a default"
        else:
            assert how == ":-", f"${{{name}}} needs a default (${{{name}:-...}})"
    example = (RAY / ".env.example").read_text()
    for name in {n for n, _ in expressions}:
        assert re.search(rf"^#? ?{name}=", example, re.M), f".env.example does not mention {name}"
    for name in SECRETS:  # listed, uncommented, with no value committed
        assert re.search(rf"^{name}=[^\n]*$", example, re.M)
        assert re.search(rf"^{name}=\s*$", example, re.M) or name == "MINIO_ROOT_USER"
    assert subprocess.run(["git", "check-ignore", "-q", str(RAY / ".env")], cwd=ROOT).returncode == 0

    # what compose must not interpolate (shell variables in commands) is written $$
    for name, service in spec["services"].items():
        for key in ("command", "entrypoint", "healthcheck"):
            value = json.dumps(service.get(key, ""))
            assert "$" not in value.replace("$$", ""), f"{name}.{key}: write $$ for the container's shell"

    env = spec["services"]["ray"]["environment"]
    start = (RAY / "start.sh").read_text()
    overridable = {f"CA2VDM_{n.upper()}" for n in servectl.OVERRIDABLE} | {"CA2VDM_SERVE_ARGS"}
    settings = {f"CA2VDM_{n.upper()}" for n in Settings.model_fields}
    for name in (n for n in env if n.startswith("CA2VDM_")):
        assert name in overridable | settings or name in start, f"nothing reads {name}"
    assert {"PGPASSWORD", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} <= set(
        env
    )
    job_store = urlparse(interpolate(env["CA2VDM_JOB_STORE_URL"]))
    assert job_store.password is None and job_store.hostname in spec["services"]
    assert urlparse(env["AWS_ENDPOINT_URL"]).hostname in spec["services"]
    bucket = urlparse(interpolate(env["CA2VDM_OBJECT_STORE_URL"])).hostname
    init = spec["services"]["minio-init"]
    assert interpolate(init["environment"]["CA2VDM_S3_BUCKET"]) == bucket and "mc mb" in " ".join(init["command"])


# ---- Prometheus and Grafana -----------------------------------------------------------------------------------------


def test_prometheus_scrapes_compose_services():
    prom = yaml.safe_load((RAY / "prometheus.yml").read_text())
    services = compose()["services"]
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert {"ca2vdm", "ray"} <= set(jobs)
    for job in jobs.values():
        for target in (t for c in job["static_configs"] for t in c["targets"]):
            host, port = target.split(":")
            assert host in services, f"{job['job_name']} scrapes {host}, not a compose service"
    assert jobs["ca2vdm"]["metrics_path"] == "/metrics"
    assert jobs["ca2vdm"]["static_configs"][0]["targets"] == [f"ray:{serve_config()['http_options']['port']}"]
    export = re.search(r"RAY_METRICS_EXPORT_PORT:-(\d+)", (RAY / "start.sh").read_text()).group(1)
    assert jobs["ray"]["static_configs"][0]["targets"] == [f"ray:{export}"]
    mounts = [interpolate(v) for v in services["prometheus"]["volumes"]]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    datasource = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert urlparse(datasource["datasources"][0]["url"]).hostname in services


def exported_metric_names() -> set[str]:
    """The names server/api/metrics.py exports (counters with _total, histograms with their series)."""
    source = (ROOT / "server" / "api" / "metrics.py").read_text()
    names = set(re.findall(r'GaugeMetricFamily\(\s*"(ca2vdm_\w+)"', source))
    names |= {f"{n}_total" for n in re.findall(r'CounterMetricFamily\(\s*"(ca2vdm_\w+)"', source)}
    for n in re.findall(r'_histogram\(\s*"(ca2vdm_\w+)"', source):
        names |= {f"{n}_bucket", f"{n}_sum", f"{n}_count"}
    assert "ca2vdm_sessions_active" in names and "ca2vdm_frames_generated_total" in names
    return names


def test_grafana_replicas_row():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert all("targets" in p for p in panels), "every panel has targets (tests/deploy/test_deploy.py reads them)"
    (row,) = [p for p in panels if p["type"] == "row" and p["title"] == "Replicas"]
    below = [p for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"] and p["type"] != "row"]
    assert len(below) >= 4
    exported = exported_metric_names()
    used = set()
    for panel in below:
        for target in panel["targets"]:
            expr = target["expr"]
            assert "by (replica)" in expr and 'replica!=""' in expr, expr
            assert "{{replica}}" in target["legendFormat"]
            names = set(re.findall(r"ca2vdm_\w+", expr))
            assert names <= exported, f"{names - exported} are not exported by the server"
            used |= names
    assert {"ca2vdm_sessions_active", "ca2vdm_realtime_capacity_sessions", "ca2vdm_frames_generated_total",
            "ca2vdm_stalls_total", "ca2vdm_cache_pages_free"} <= used  # fmt: skip
    # a 24-column grid without overlaps
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {panel['id']} overlaps another"
        cells |= area


# ---- KubeRay --------------------------------------------------------------------------------------------------------


def containers(rs: dict) -> list[tuple[str, dict, dict]]:
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group, c) for name, group in groups for c in group["template"]["spec"]["containers"]]


def test_kuberay_serve_config_is_the_same_app():
    rs = rayservice()
    assert rs["apiVersion"] == "ray.io/v1"
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    args = check_app_config(config)
    local = serve_config()
    assert config["proxy_location"] == local["proxy_location"] and config["http_options"] == local["http_options"]
    assert set(args) - REPLICA_ARGS - {"api_key_file"} == set(app_of(local)["args"]) - REPLICA_ARGS
    assert {"min_replicas", "max_replicas"} <= set(args), "the GPU worker group autoscales with Serve"


def test_kuberay_cluster():
    docs = kuberay()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "RayService"}
    rs = rayservice()
    cluster = rs["spec"]["rayClusterConfig"]
    args = app_of(yaml.safe_load(rs["spec"]["serveConfigV2"]))["args"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert re.fullmatch(r"2\.\d+\.\d+", cluster["rayVersion"])
    assert tuple(map(int, cluster["rayVersion"].split(".")[:2])) >= (2, 52), "token authentication needs Ray 2.52"
    assert cluster["authOptions"] == {"mode": "token"}

    head = cluster["headGroupSpec"]
    (gpu,) = cluster["workerGroupSpecs"]
    for group in (head, gpu):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    per_pod = 1 / args["gpus_per_replica"]  # engine replicas a one-GPU pod holds
    assert gpu["minReplicas"] * per_pod >= args["min_replicas"], "min_replicas find GPU pods at once"
    assert gpu["maxReplicas"] * per_pod >= args["max_replicas"], "the GPU group can hold max_replicas"

    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for name, group, container in containers(rs):
        images.add(container["image"])
        limits = container["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == (name != "head"), name
        if name != "head":
            assert limits["nvidia.com/gpu"] == 1 and container["resources"]["requests"]["nvidia.com/gpu"] == 1
        for probe in ("readinessProbe", "livenessProbe"):
            assert "httpGet" in container[probe], f"{name}: HTTP probes (the image has no wget for exec probes)"
        env = {e["name"]: e for e in container["env"]}
        for secret in ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[secret]["valueFrom"]["secretKeyRef"]["name"] == "ca2vdm-secrets", (name, secret)
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert (
            volumes[mounts[args["session_dir"]]["name"]]["persistentVolumeClaim"]["claimName"]
            == pvc["metadata"]["name"]
        )
        assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        key_dir = str(Path(args["api_key_file"]).parent)
        assert volumes[mounts[key_dir]["name"]]["secret"]["secretName"] == "ca2vdm-secrets"
        assert group["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    assert len(images) == 1
    ports = {p["name"]: p["containerPort"] for p in containers(rs)[0][2]["ports"]}
    assert ports["serve"] == 8000 and ports["dashboard"] == 8265
    # KubeRay's serve Service sends traffic to Ready worker pods: a worker is ready only with a Serve proxy on it
    # (none with HeadOnly), as KubeRay's own probe has it; the head's readiness must not wait for the app
    for name, _, container in containers(rs):
        ready = container["readinessProbe"]["httpGet"]
        assert (ready["path"], ready["port"]) == (
            ("/api/gcs_healthz", 8265) if name == "head" else ("/-/healthz", 8000)
        )


# ---- the image and the guide ----------------------------------------------------------------------------------------


def test_dockerfile_installs_the_cluster_extra():
    text = (ROOT / "Dockerfile").read_text()
    extras = re.search(r'pip install "\.\[([a-z,]+)\]"', text).group(1).split(",")
    assert {"vae", "cluster"} <= set(extras)
    assert re.search(r"mkdir -p [^\n]*/sessions", text) and re.search(r"chown 10001:10001 [^\n]*/sessions", text)


def test_scale_out_guide_names_the_files():
    guide = (ROOT / "docs" / "scale-out.md").read_text()
    for name in ("serve.yaml", "docker-compose.yml", "kuberay-rayservice.yaml", "start.sh", "servectl.py",
                 ".env.example", "prometheus.yml", IMPORT_PATH, "Replicas"):  # fmt: skip
        assert name in guide, name
