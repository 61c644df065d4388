#!/usr/bin/env bash
# Train and evaluate the packaged default model (server/weights/default) on one GPU.
#
#   scripts/train_default_model.sh OUT_DIR [MINUTES]
#
# Trains the `small` preset on procedural sprites for MINUTES of wall-clock time (default 6.5), then scores
# 30 AR steps (240 frames) of the trained EMA weights and of random weights against the ground truth.
# OUT_DIR/run/model is the servable model; OUT_DIR/eval_*.json the scores, OUT_DIR/sheet_*.png truth above generated
# frames; OUT_DIR/train.log the log.
# INIT_FROM=DIR continues from a model directory's weights (fresh optimiser); COMPILE=1 trains under torch.compile;
# EVAL=0 skips the evaluation.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [MINUTES]}
minutes=${2:-6.5}
ca2vdm=${CA2VDM:-ca2vdm}
mkdir -p "$out"
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
init=()
if [[ -n ${INIT_FROM:-} ]]; then init=(--init-from "$INIT_FROM"); fi
if [[ ${COMPILE:-0} == 1 ]]; then init+=(--compile); fi

$ca2vdm train --preset small --data sprites --seed "${SEED:-0}" --steps 1000000 --max-minutes "$minutes" \
  --batch-size 128 --lr 3e-4 --warmup-steps 500 --ema-decay 0.999 --num-workers "$workers" \
  --log-every 250 --ckpt-every 1000000 --device cuda --out "$out/run" "${init[@]}" 2> "$out/train.log"
tail -c 2000 "$out/train.log" | tr '\r' '\n' | tail -3
[[ ${EVAL:-1} == 0 ]] && exit 0

for spec in "$out/run/model:ddim:10" "$out/run/model:ddim:25" "random:small:ddim:10"; do
  model=${spec%:*:*}; rest=${spec#"$model":}; sampler=${rest%:*}; steps=${rest#*:}
  name=$( [[ $model == random:* ]] && echo random || echo trained )_${sampler}${steps}
  $ca2vdm eval --model "$model" --videos "${EVAL_VIDEOS:-6}" --sampler "$sampler" --steps "$steps" \
    --device cuda --out "$out/eval_$name.json" --sheet "$out/sheet_$name.png" | tail -2
done
