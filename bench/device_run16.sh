#!/usr/bin/env bash
# Run 16 of issue 17 (docs/performance.md): one nvidia-h200. SAM2's image encoder on a second CUDA
# stream beside the ViT (sa2va.model.OVERLAP_ENCODERS), against one stream, in the compiled
# evaluation forward path at 26B (batch 8, 64 images, as run 12's b8x64), each a fresh process:
#   bash bench/device_run16.sh OUT
#   two      the default since session 4 (two streams)
#   one      --one-stream
#   two2     two streams again (the spread between processes)
# Ran at commit a74ede6. The second stream gave no gain (docs/performance.md, run 16) and was
# removed with --one-stream: on later commits every part runs the one-stream path.
set -uo pipefail
OUT=${1:?usage: device_run16.sh OUT}
RUN=run16
source bench/device_parts.sh
B="python3 bench/train_bench.py --device cuda --plan 26b=evalcs --eval-generate 2 --eval-images 64 --eval-batch 8"
part two 150 $B --out "$R/run16_two.json"
part one 120 $B --one-stream --out "$R/run16_one.json"
part two2 120 $B --out "$R/run16_two2.json"
grep -h -E "evalcs:|failed|Error" "$R"/run16_two.log "$R"/run16_one.log "$R"/run16_two2.log | cut -c1-400
