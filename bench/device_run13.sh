#!/usr/bin/env bash
# Run 13 of issue 17 (docs/performance.md): one nvidia-h200. The evaluation forward path at 26B
# eager (nothing compiled) after run 12's pipelining change, 64 images at batch 8: what
# evaluate.py does without --compile, and the base of the --compile break-even.
#   bash bench/device_run13.sh OUT
set -uo pipefail
OUT=${1:?usage: device_run13.sh OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
start=$(date +%s)
timeout 200 python3 bench/train_bench.py --device cuda --plan "26b=eval" --eval-images 64 --eval-generate 2 \
  --eval-batch 8 --out "$OUT/h200_run13_eval.json" > "$OUT/h200_run13_eval.log" 2>&1
echo "eval: exit $? in $(( $(date +%s) - start )) s" | tee "$OUT/h200_run13_parts.txt"
grep -h -E "eval:|failed|Error" "$OUT/h200_run13_eval.log" | head
