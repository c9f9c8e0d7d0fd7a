#!/usr/bin/env bash
# Run 11 of issue 17 (docs/performance.md): one nvidia-h200, each part in its own process.
#   bash bench/device_run11.sh OUT
#   evalcs   26B evaluation forward path (LLM + ViT + SAM2 compiled), 64 images: images/s, the
#            GPU time per phase (vit / sam_enc / llm_fwd / heads_fwd / post) and a kernel profile
#   fast4    26B training step compiled at 4 x 1 (SDPA attention): the denominator of
#            mission_command_vs_best
#   mission  train_dpo.py --cfg configs/v8.yaml as typed at the 26B shape, one GPU, 60 steps
set -uo pipefail
OUT=${1:?usage: device_run11.sh OUT}
RUN=run11
source bench/device_parts.sh
B="python3 bench/train_bench.py --device cuda --steps 5 --warmup 2"
part evalcs 200 $B --plan "26b=evalcs" --eval-images 64 --eval-generate 2 \
  --eval-profile "$R/run11_eval_profile.txt" --out "$R/run11_evalcs.json"
part fast4 120 $B --plan "26b=fast@4x1" --out "$R/run11_fast4.json"
part mission 200 python3 experiments/multi_gpu.py --out "$R/mission" --gpus 1 --steps 60 --only ddp --preset 26b
grep -h -E "samples/s/GPU|forward|failed|Error" "$R"/run11_*.log | head -20
grep -h -A12 '"ddp1"' "$R/mission/multi_gpu.json" 2>/dev/null | head -30
