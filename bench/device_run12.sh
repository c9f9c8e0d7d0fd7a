#!/usr/bin/env bash
# Run 12 of issue 17 (docs/performance.md): one nvidia-h200, each part in its own process.
# The evaluation forward path at 26B (LLM + ViT + SAM2 compiled) after the pipelining change
# (chunks pinned after the join, non-blocking copies, probabilities read back a chunk late):
#   bash bench/device_run12.sh OUT
#   b8x128   batch 8, 128 images, with a kernel profile
#   b8x64    batch 8, 64 images (run 11's setting, before the change: 18.36 images/s)
#   b16x128  batch 16, 128 images
set -uo pipefail
OUT=${1:?usage: device_run12.sh OUT}
RUN=run12
source bench/device_parts.sh
B="python3 bench/train_bench.py --device cuda --plan 26b=evalcs --eval-generate 2"
part b8x128 150 $B --out "$R/run12_b8x128.json" --eval-images 128 --eval-batch 8 --eval-profile "$R/run12_eval_profile.txt"
part b8x64 120 $B --out "$R/run12_b8x64.json" --eval-images 64 --eval-batch 8
part b16x128 150 $B --out "$R/run12_b16x128.json" --eval-images 128 --eval-batch 16
grep -h -E "evalcs:|failed|Error" "$R"/run12_*.log | head -20
