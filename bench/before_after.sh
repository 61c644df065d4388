#!/usr/bin/env bash
# `ca2vdm bench` on a baseline commit and on the working tree, in one process sequence on one card (the same device
# call), so their ratios are comparable. Run on the lent GPU after `source bench/device_env.sh`.
#   bash bench/before_after.sh BASE_COMMIT NEW_COMMIT OUT_DIR [bench args...]
# The baseline travels as .dev/base_<BASE_COMMIT>.tar (`git archive BASE server kernels client pyproject.toml`);
# baselines from before the ca2vdm namespace run as `python3 -m server.cli`, later ones as `-m ca2vdm.server.cli`.
set -euo pipefail
base=$1 new=$2 out=$3
shift 3
rm -rf /tmp/base && mkdir -p /tmp/base && tar xf ".dev/base_${base}.tar" -C /tmp/base
if [ -d /tmp/base/ca2vdm ]; then
    for d in server kernels client; do ln -sfn "../$d" "/tmp/base/ca2vdm/$d"; done
    (cd /tmp/base && PYTHONPATH="/tmp/base:/tmp/site" python3 -m ca2vdm.server.cli bench --commit "$base" \
        --out "$out/bench_base_${base}.json" "$@")
else
    (cd /tmp/base && PYTHONPATH="/tmp/base:/tmp/site" python3 -m server.cli bench --commit "$base" \
        --out "$out/bench_base_${base}.json" "$@")
fi
python3 -m ca2vdm.server.cli bench --commit "$new" --out "$out/bench_new_${new}.json" "$@"
