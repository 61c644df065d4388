"""Helper for deploy/ray/start.sh (standard library + PyYAML, both in the image; Ray's schema when importable).

    python3 servectl.py render serve.yaml [--gpus N] > rendered.yaml   # serve.yaml with the environment's overrides
    python3 servectl.py wait http://127.0.0.1:8265 [--timeout S]      # until Ray's dashboard answers
    python3 servectl.py drain http://127.0.0.1:8265 [--timeout S]     # delete the Serve apps, wait until they are gone

`render` reads the ca2vdm application's args from the config and replaces each one named in OVERRIDABLE by
the environment variable CA2VDM_<NAME> when that is set and not empty (an empty value keeps the file's), then
merges CA2VDM_SERVE_ARGS (a JSON object, for any other server setting). Engine replicas: CA2VDM_MIN_REPLICAS /
CA2VDM_MAX_REPLICAS switch to autoscaling; else CA2VDM_REPLICAS fixes the count; else, given --gpus, one replica
per gpus_per_replica GPUs of the node (unless the file itself autoscales).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request

import yaml

APP_NAME = "ca2vdm"
IMPORT_PATH = "ca2vdm.server.cluster.app:build"
# args an environment variable CA2VDM_<NAME> overrides (documented beside each in serve.yaml)
OVERRIDABLE = (
    "model", "preset", "vae", "device", "precision", "text_encoder", "data_dir", "max_sessions", "max_batch",
    "api_key_file", "allowed_origins", "cors_origins", "job_store_url", "object_store_url", "session_dir",
    "gpus_per_replica", "ingress_replicas", "replicas", "min_replicas", "max_replicas",
)  # fmt: skip
INTEGERS = {"max_sessions", "max_batch", "ingress_replicas", "replicas", "min_replicas", "max_replicas"}
NUMBERS = {"gpus_per_replica"}
REPLICA_KEYS = ("replicas", "min_replicas", "max_replicas")


class ConfigError(ValueError):
    pass


def _env(name: str, environ: dict[str, str]) -> str | None:
    value = environ.get(f"CA2VDM_{name.upper()}", "").strip()
    return value or None


def _typed(name: str, value: str) -> object:
    try:
        if name in INTEGERS:
            return int(value)
        if name in NUMBERS:
            number = float(value)
            return int(number) if number.is_integer() else number
    except ValueError:
        raise ConfigError(f"CA2VDM_{name.upper()}={value!r} is not a number") from None
    return value


def application(config: dict) -> dict:
    apps = [a for a in config.get("applications") or [] if a.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ConfigError(f"the config has no application named {APP_NAME!r}")
    return apps[0]


def render(config: dict, environ: dict[str, str], gpus: int | None = None) -> dict:
    """The config with the environment's overrides applied (a new dict; `config` is left as it was)."""
    config = json.loads(json.dumps(config))
    app = application(config)
    args = dict(app.get("args") or {})
    for name in OVERRIDABLE:
        value = _env(name, environ)
        if value is not None and name not in REPLICA_KEYS:
            args[name] = _typed(name, value)
    extra = environ.get("CA2VDM_SERVE_ARGS", "").strip()
    if extra:
        try:
            more = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"CA2VDM_SERVE_ARGS is not JSON: {exc}") from None
        if not isinstance(more, dict):
            raise ConfigError("CA2VDM_SERVE_ARGS must be a JSON object")
        args.update(more)

    fixed, low, high = (_env(n, environ) for n in REPLICA_KEYS)
    per_replica = float(args.get("gpus_per_replica", 1))
    if low is not None or high is not None:  # autoscaling between min and max
        args.pop("replicas", None)
        args["min_replicas"] = _typed("min_replicas", low) if low is not None else args.get("min_replicas", 1)
        default_high = max(1, math.floor(gpus / per_replica)) if gpus and per_replica > 0 else 1
        args["max_replicas"] = (
            _typed("max_replicas", high) if high is not None else args.get("max_replicas", default_high)
        )
    elif fixed is not None:
        args["replicas"] = _typed("replicas", fixed)
        args.pop("min_replicas", None)
        args.pop("max_replicas", None)
    elif gpus and per_replica > 0 and "min_replicas" not in args and "max_replicas" not in args:
        args["replicas"] = max(1, math.floor(gpus / per_replica))  # one engine replica per GPU (or per group)

    if "replicas" in args and ("min_replicas" in args or "max_replicas" in args):
        raise ConfigError("set either replicas or min_replicas/max_replicas, not both")
    if "min_replicas" in args and args["min_replicas"] > args.get("max_replicas", args["min_replicas"]):
        raise ConfigError(f"min_replicas {args['min_replicas']} > max_replicas {args['max_replicas']}")
    app["args"] = {k: v for k, v in args.items() if v is not None and v != ""}
    return config


def validate(config: dict) -> None:
    """Ray's own schema check, where Ray is installed (it is in the image)."""
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return
    ServeDeploySchema.model_validate(config)


def _request(url: str, method: str = "GET") -> urllib.request.Request:
    """A request to Ray's dashboard, with Ray's token when token authentication is on (RAY_AUTH_TOKEN)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.Request(url, method=method, headers=headers)


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(_request(url), timeout=timeout) as response:
        return response.read()


def wait(dashboard: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _get(f"{dashboard}/api/gcs_healthz", 2)
            return True
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    return False


def drain(dashboard: str, timeout: float) -> bool:
    """Delete every Serve application (each replica gets its graceful shutdown: a draining engine takes no new
    sessions, its streams finish or detach for a resume elsewhere) and wait until they are gone."""
    url = f"{dashboard}/api/serve/applications/"
    try:
        urllib.request.urlopen(_request(url, "DELETE"), timeout=10).close()
    except (urllib.error.URLError, OSError) as exc:
        print(f"servectl: cannot delete the Serve applications: {exc}", file=sys.stderr)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not json.loads(_get(url, 5)).get("applications"):
                return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="print the config with the environment's overrides")
    p.add_argument("config")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of this node (one engine replica per GPU)")
    for name in ("wait", "drain"):
        p = sub.add_parser(name)
        p.add_argument("dashboard", help="Ray dashboard address, e.g. http://127.0.0.1:8265")
        p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    if args.command == "render":
        with open(args.config) as f:
            config = yaml.safe_load(f)
        try:
            rendered = render(config, dict(os.environ), args.gpus)
            validate(rendered)
        except ValueError as exc:  # ConfigError and pydantic's ValidationError
            print(f"servectl: invalid Serve config: {exc}", file=sys.stderr)
            return 2
        args_out = application(rendered)["args"]
        want = args_out.get("replicas", args_out.get("max_replicas", 1)) * float(args_out.get("gpus_per_replica", 1))
        if args.gpus is not None and want > args.gpus:
            print(f"servectl: warning: the replicas want {want:g} GPUs, this node has {args.gpus}", file=sys.stderr)
        sys.stdout.write(yaml.safe_dump(rendered, sort_keys=False))
        return 0
    ok = wait(args.dashboard, args.timeout) if args.command == "wait" else drain(args.dashboard, args.timeout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
