#!/usr/bin/env bash
# Real-time capacity runs on the lent GPU (device tool), from the repository root; results land in $OUT.
#   bash bench/device_realtime.sh base BASE_COMMIT   # the baseline: bench --realtime (bf16) of .dev/base_<BASE>.tar,
#                                                    # and bench/vae_decode.py (eager vs compiled decoder)
#   bash bench/device_realtime.sh new COMMIT [ARGS]  # bench --realtime of the working tree: bf16 and fp8 with a
#                                                    # 64-frame REST job at the held load, then bf16 with the eager
#                                                    # decoder; ARGS go to each
# Each step has its own time limit so one slow step cannot take the call's 10 minutes.
set -uo pipefail
source bench/device_env.sh
phase=$1 commit=$2
shift 2
common=(bench --realtime --model random:XL/2 --device cuda --hold 20 --probes 5)
if [ "$phase" = base ]; then
    timeout 170 python3 bench/vae_decode.py --commit "$commit" --out "$OUT/vae_decode.json"
    rm -rf /tmp/base && mkdir -p /tmp/base && tar xf ".dev/base_${commit}.tar" -C /tmp/base
    for d in server kernels client; do ln -sfn "../$d" "/tmp/base/ca2vdm/$d"; done
    (cd /tmp/base && PYTHONPATH="/tmp/base:/tmp/site" timeout 300 python3 -m ca2vdm.server.cli "${common[@]}" \
        --commit "$commit" --out "$OUT/realtime_bf16_base.json")
else
    timeout 220 python3 -m ca2vdm.server.cli "${common[@]}" --job-frames 64 --commit "$commit" \
        --out "$OUT/realtime_bf16.json" "$@"
    timeout 220 python3 -m ca2vdm.server.cli "${common[@]}" --job-frames 64 --precision fp8 --commit "$commit" \
        --out "$OUT/realtime_fp8.json" "$@"
    timeout 140 python3 -m ca2vdm.server.cli "${common[@]}" --eager-decoder --commit "$commit" \
        --out "$OUT/realtime_bf16_eager_decoder.json" "$@"
fi
