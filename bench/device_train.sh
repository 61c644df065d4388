#!/usr/bin/env bash
# Links of the default model's training chain on a lent GPU machine (device tool), from the repository root:
#
#   bash bench/device_train.sh ablate MINUTES [VARIANT...]
#       trains the variants side by side on the one GPU for MINUTES each, all from the packaged model's weights,
#       scores each (and the packaged model) over 30 AR steps, and sends the best variant's whole training state
#       back. A variant is NAME=FLAGS, e.g. 'degrade=--degrade-prob 0.5'.
#   bash bench/device_train.sh continue MINUTES [FLAGS...]
#       resumes the state carried in .dev/chain (trainer.pt in pieces; the optimiser's moments included), trains
#       MINUTES with FLAGS, sends the new state back, then scores 30 AR steps (at most EVAL_TIMEOUT seconds).
#       MINUTES + ~2.5 must stay inside the call's 10 minutes (start-up, data workers, evaluation, archive).
#
# What comes back under $OUT: trainer.pt.part-* (split at 15 MiB; `cat` them together), and report.tgz with every
# run's log, history and evaluation (JSON) and contact sheets. SEED varies the clips from link to link.
set -euo pipefail
# training and scoring need only what the machine's image has (torch, numpy, safetensors, pillow, tqdm): the
# tree is made importable as ca2vdm as bench/device_env.sh does, without its server packages
for d in server kernels client; do ln -sfn "../$d" "ca2vdm/$d"; done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
work=/tmp/chain
mkdir -p "$out" "$work"
cli=(python3 -m ca2vdm.server.cli)
mode=${1:?ablate or continue}
minutes=${2:?minutes}
shift 2
common=(--preset small --data sprites --steps 10000000 --max-minutes "$minutes" --batch-size 128 --lr 3e-4
        --ema-decay 0.999 --log-every 250 --ckpt-every 10000000 --device cuda)
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$work/card.txt"

evaluate() {  # evaluate NAME MODEL_DIR AR_STEPS, for at most EVAL_TIMEOUT seconds
  timeout "${EVAL_TIMEOUT:-150}" "${cli[@]}" eval --model "$2" --videos "${EVAL_VIDEOS:-8}" --ar-steps "$3" --sampler ddim --steps 10 \
    --device cuda --out "$work/eval_$1_ar$3.json" --sheet "$work/sheet_$1_ar$3.png" > "$work/eval_$1_ar$3.log" 2>&1
}

score() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['score'])" "$1"; }

case $mode in
  ablate)
    (( $# )) || set -- "control=" "degrade=--degrade-prob 0.5" "rollout=--rollout-prob 0.25" \
                       "both=--degrade-prob 0.3 --rollout-prob 0.25"
    n=$#
    workers=$(( ($(nproc) - 2) / n > 1 ? ($(nproc) - 2) / n : 1 ))
    names=()
    for v in "$@"; do
      name=${v%%=*}; read -r -a flags <<< "${v#*=}"
      names+=("$name")
      "${cli[@]}" train "${common[@]}" --warmup-steps 500 --seed "${SEED:-1}" --num-workers "$workers" \
        --init-from server/weights/default --out "$work/$name" "${flags[@]}" > "$work/train_$name.log" 2>&1 &
    done
    wait
    evaluate packaged server/weights/default 30 &
    for name in "${names[@]}"; do evaluate "$name" "$work/$name/model" 30 & done
    wait
    best=""; best_score=-1
    for name in packaged "${names[@]}"; do
      s=$(score "$work/eval_${name}_ar30.json"); echo "$name: score $s, $(grep -c . "$work/$name/history.json" 2>/dev/null || echo -) history lines"
      if [[ $name != packaged ]] && python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$s" "$best_score"; then
        best=$name; best_score=$s
      fi
    done
    echo "best: $best ($best_score)"
    echo "$best" > "$work/best.txt"
    state=$work/$best/trainer.pt ;;
  continue)
    cat .dev/chain/trainer.pt.part-* > "$work/run.pt"
    mkdir -p "$work/run" && mv "$work/run.pt" "$work/run/trainer.pt"
    "${cli[@]}" train "${common[@]}" --seed "${SEED:-2}" --num-workers $(( $(nproc) - 2 )) --resume \
      --out "$work/run" "$@" > "$work/train_run.log" 2>&1
    split -b 15M "$work/run/trainer.pt" "$out/trainer.pt.part-"  # the state first: an evaluation cut short loses nothing
    # 8 videos of 30 AR steps take ~1 min here; score 120 AR steps on the CPU (ca2vdm eval --ar-steps 120)
    evaluate run "$work/run/model" 30 || echo "evaluation did not finish in ${EVAL_TIMEOUT:-150} s"
    [[ -f $work/eval_run_ar30.json ]] && echo "score $(score "$work/eval_run_ar30.json")"
    state="" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
python3 - "$work" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
for h in sorted(work.glob("*/history.json")):
    rows = json.loads(h.read_text())
    if rows:
        last = rows[-1]
        print(f"{h.parent.name}: step {last['step']}, this run {last['seconds'] / 60:.1f} min, mse of the last 4 logs {sum(r['mse'] for r in rows[-4:]) / len(rows[-4:]):.4f}")
EOF
if [[ -n $state ]]; then split -b 15M "$state" "$out/trainer.pt.part-"; fi
tar czf "$out/report.tgz" -C "$work" $(cd "$work" && ls *.log *.json *.png *.txt */history.json 2>/dev/null)
ls -la "$out"
