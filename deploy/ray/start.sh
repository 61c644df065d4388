#!/usr/bin/env bash
# Entry point of the `ray` service of deploy/ray/docker-compose.yml: a Ray head node with every GPU the
# container sees, then the ca2vdm Serve application (serve.yaml with the environment's overrides, see
# servectl.py), then it waits on Ray. On SIGTERM (docker compose stop/down) it deletes the application first, so
# every engine replica drains (no new sessions; streams finish or are saved to session_dir), then stops Ray.
#
# Environment (besides the app's own CA2VDM_* overrides, listed in serve.yaml):
#   CA2VDM_NUM_GPUS          GPUs Ray may use; default: those `nvidia-smi -L` lists (0 without a driver)
#   CA2VDM_REPLICAS          engine replicas; default: one per GPU (per CA2VDM_GPUS_PER_REPLICA GPUs)
#   CA2VDM_API_KEY           written to a private file whose path the app gets as api_key_file
#   CA2VDM_DRAIN_TIMEOUT_S   how long a stop waits for the replicas to drain (default 90; keep it below
#                            the compose stop_grace_period)
#   RAY_AUTH_TOKEN           turns on Ray's token authentication (dashboard, GCS) with this token
#   RAY_GCS_PORT, RAY_DASHBOARD_PORT, RAY_METRICS_EXPORT_PORT   6379, 8265 and 8080 by default
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=${CA2VDM_SERVE_CONFIG:-$here/serve.yaml}
run_dir=${CA2VDM_RUN_DIR:-/tmp/ca2vdm}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
dashboard=http://127.0.0.1:$dashboard_port
drain_timeout=${CA2VDM_DRAIN_TIMEOUT_S:-90}

log() { echo "start.sh: $*" >&2; }

gpus=${CA2VDM_NUM_GPUS:-}
if [[ -z $gpus ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    else
        gpus=0
    fi
fi
log "$gpus GPU(s) for Ray"

# Ray's token authentication (the dashboard and the GCS can run arbitrary code): on with a RAY_AUTH_TOKEN, which
# `serve deploy` and servectl.py then send; explicitly off without one (Ray would otherwise decide from whether a
# token file happens to exist in $HOME)
if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    export RAY_AUTH_MODE=token
else
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
    log "warning: no RAY_AUTH_TOKEN: Ray's dashboard and GCS accept anyone who reaches them"
fi

mkdir -p "$run_dir"
chmod 700 "$run_dir"
if [[ -n ${CA2VDM_API_KEY:-} ]]; then
    (umask 077 && printf '%s' "$CA2VDM_API_KEY" >"$run_dir/api-key")
    export CA2VDM_API_KEY_FILE=$run_dir/api-key
fi
unset CA2VDM_API_KEY  # the replicas read the file; the key itself stays out of Ray's processes and config

# render first: a bad setting fails here, before Ray starts
python3 "$here/servectl.py" render "$config" --gpus "$gpus" >"$run_dir/serve.yaml"

ray start --head --port="${RAY_GCS_PORT:-6379}" --num-gpus="$gpus" \
    --dashboard-host=0.0.0.0 --dashboard-port="$dashboard_port" \
    --metrics-export-port="${RAY_METRICS_EXPORT_PORT:-8080}" \
    --disable-usage-stats --block &
ray_pid=$!

stop() {
    local code=${1:-0}
    trap - TERM INT
    log "stopping: draining the replicas (up to ${drain_timeout}s), then Ray"
    python3 "$here/servectl.py" drain "$dashboard" --timeout "$drain_timeout" || log "drain incomplete"
    ray stop || true                     # Ray's processes (this container's only Ray) ...
    kill -TERM "$ray_pid" 2>/dev/null || true  # ... and `ray start --block`, which outlives them
    wait "$ray_pid" || true
    exit "$code"
}
trap 'stop 0' TERM INT

if ! python3 "$here/servectl.py" wait "$dashboard" --timeout 300; then
    log "Ray's dashboard did not come up"
    stop 1
fi
if ! serve deploy "$run_dir/serve.yaml" --address "$dashboard"; then
    log "serve deploy failed"
    stop 1
fi
log "application deployed; readiness: http://127.0.0.1:8000/readyz, Ray dashboard: $dashboard"

set +e
wait "$ray_pid"
status=$?
log "Ray exited ($status)"
exit "$status"
