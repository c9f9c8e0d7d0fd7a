#!/usr/bin/env bash
# Run 8 of issue 17 (docs/performance.md): one nvidia-h200, each part in its own process.
#   bash bench/device_run8.sh OUT
#   train    26B training step compiled, SDPA attention, 24 x 2 and 16 x 2 again (run-to-run spread)
#   evalcs   26B evaluation forward path: LLM + ViT compiled, then SAM2's Hiera blocks too
#   fp32     run 7's float32 agreement check again, with how decided the forward masks are
set -uo pipefail
OUT=${1:?usage: device_run8.sh OUT}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
B="python3 bench/train_bench.py --device cuda --steps 5 --warmup 2"
part() {  # NAME LIMIT_S ARGS...
  local name=$1 limit=$2 start=$(date +%s) rc
  shift 2
  timeout "$limit" "$@" > "$R/run8_$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$R/parts.txt"
  tar -czf "$OUT/results.tar.gz" -C "$R" .
}
part train 130 $B --plan "26b=fast@24x2,fast@16x2" --out "$R/run8_train.json"
part evalcs 170 $B --plan "26b=evalc,evalcs" --eval-images 32 --eval-generate 8 --out "$R/run8_evalcs.json"
part fp32 80 $B --plan "26b=eval" --dtype float32 --eval-images 8 --eval-generate 8 --eval-batch 4 \
  --out "$R/run8_fp32.json"
grep -h -E "samples/s/GPU|forward|failed|Error|agreement" "$R"/run8_*.log | head -40
