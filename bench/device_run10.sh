#!/usr/bin/env bash
# Run 10 of issue 17 (docs/performance.md): one nvidia-h200. The evaluation forward path at 26B
# with LLM + ViT + SAM2 compiled in a fresh process (run 8's evalcs reused evalc's graphs): a second
# measurement of its images/s, and its compile time from nothing.
#   bash bench/device_run10.sh OUT
set -uo pipefail
OUT=${1:?usage: device_run10.sh OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
start=$(date +%s)
timeout 250 python3 bench/train_bench.py --device cuda --steps 5 --warmup 2 --plan "26b=evalcs" \
  --eval-images 32 --eval-generate 2 --out "$OUT/h200_run10_evalcs.json" > "$OUT/h200_run10_evalcs.log" 2>&1
echo "evalcs: exit $? in $(( $(date +%s) - start )) s" | tee "$OUT/h200_run10_parts.txt"
grep -E "images/s|forward|compile|failed|Error" "$OUT/h200_run10_evalcs.log" | head -20
