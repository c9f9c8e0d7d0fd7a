#!/usr/bin/env bash
# Run 14 of issue 17 (docs/performance.md): one nvidia-h200. The 26B training step compiled with
# SDPA attention at 24 x 2 and 16 x 2 once more (run 8's part `train`): a third machine start for
# the headline, whose margin over the target (23 samples/s) was within the spread of runs 7-8.
#   bash bench/device_run14.sh OUT
set -uo pipefail
OUT=${1:?usage: device_run14.sh OUT}
RUN=run14
source bench/device_parts.sh
part train 150 python3 bench/train_bench.py --device cuda --steps 5 --warmup 2 --plan "26b=fast@24x2,fast@16x2" \
  --out "$R/run14_train.json"
grep -h -E "samples/s/GPU|failed|Error" "$R"/run14_*.log | head
