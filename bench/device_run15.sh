#!/usr/bin/env bash
# Run 15 of issue 17 (docs/performance.md): one nvidia-h200. After session 4 moved the training
# feature cache and the tiled forward onto the threaded, non-blocking chunk pipeline:
#   bash bench/device_run15.sh OUT
#   mission  train_dpo.py --cfg configs/v8.yaml as typed at the 26B shape, one GPU, 60 steps
#   tiled    evaluate.py on the shipped tiny baseline with 128 px tiles over 256 px synthetic
#            images: CUDA (float32 weights, no autocast) against the same run on the CPU
set -uo pipefail
OUT=${1:?usage: device_run15.sh OUT}
RUN=run15
source bench/device_parts.sh
part mission 200 python3 experiments/multi_gpu.py --out "$R/mission" --gpus 1 --steps 60 --only ddp --preset 26b
D=/tmp/run15_data
python3 -m sa2va.synth --out "$D" --n 12 --size 256 --seed 5 > /dev/null
for dev in cuda cpu; do
  part "tiled_$dev" 200 python3 evaluate.py --model assets/baseline --data "$D" --out "$R/tiled_$dev" \
    --trust-remote-code --device "$dev" --dtype float32 --tile-size 128 --tile-overlap 16
done
grep -h -A12 '"ddp1"' "$R/mission/multi_gpu.json" 2>/dev/null | head -14
python3 - "$R" <<'PY'
import json, sys
r = {d: json.load(open(f"{sys.argv[1]}/tiled_{d}/results.json")) for d in ("cuda", "cpu")}
for d, res in r.items():
    print(d, {k: res["metrics"][k]["mean"] for k in ("dice", "cldice") if k in res["metrics"]})
PY
