#!/usr/bin/env bash
# bench/scaleout.py on a lent GPU machine (device tool), from the repository root, with .dev/site.tar.xz,
# .dev/ray312.tar.xz and .dev/ray312_install.sh carried (Ray Serve 2.60 for cp312, trimmed: see the install script):
#   bash bench/device_scaleout.sh gpu        one H200: the single server vs one engine replica on Ray Serve (XL/2, bf16)
#   bash bench/device_scaleout.sh overhead   one H200: what the Ray hop adds per REST call and websocket message
#   bash bench/device_scaleout.sh cpu        the machine's 16 cores: 1, 2, 3 replicas of 4 threads (default model's shape)
#   bash bench/device_scaleout.sh x2         two H200s (nvidia-h200-x2): 1 and 2 replicas (XL/2, bf16), then one killed
set -euo pipefail
source bench/device_env.sh
bash .dev/ray312_install.sh /tmp/site > /dev/null
export PATH="/tmp/site/bin:$PATH" RAY_DEDUP_LOGS=1
out="${OUT:-/tmp}"
case "${1:?gpu, overhead or cpu}" in
  gpu) python3 bench/scaleout.py --device cuda --model random:XL/2 --precision bf16 --replicas 1 --gpus 1 \
         --hold-s 30 --probes 6 --max-sessions 16 --skip overhead --out "$out/scaleout_h200_gpu.json" ;;
  overhead) python3 bench/scaleout.py --device cuda --model random:XL/2 --precision bf16 --gpus 1 --requests 100 \
         --skip single,ray --out "$out/scaleout_h200_overhead.json" ;;
  cpu) python3 bench/scaleout.py --device cpu --model random:small --torch-threads 4 --replicas 1,2,3 --gpus 3 \
         --hold-s 30 --probes 6 --skip overhead --out "$out/scaleout_cpu16.json" ;;
  x2) python3 bench/scaleout.py --device cuda --model random:XL/2 --precision bf16 --replicas 1,2 --gpus 2 \
         --hold-s 30 --probes 6 --max-sessions 16 --kill --skip single,overhead --out "$out/scaleout_h200x2.json" ;;
esac
