#!/usr/bin/env bash
# The device run of issue 17 on one H200 (docs/performance.md, "Fast defaults"):
#   bash bench/device_run.sh OUT [FAMILY] [PARTS]
# PARTS (default "26b 4b mission"): the benchmark at the 26B shape (evaluation forward path,
# the loop's on-device step compiled at micro-batch 4, 8 and 16, and the older compiled step),
# the 4B shape at micro-batch 32 and 64, and the mission's command as typed
# (train_dpo.py --cfg configs/v8.yaml, its defaults) at the 26B shape through experiments/multi_gpu.py.
# Everything lands in OUT/results.tar.gz (the device tool returns at most 8 files).
set -uo pipefail
OUT=${1:?usage: device_run.sh OUT [FAMILY] [PARTS]}
FAMILY=${2:-}
PARTS=${3:-26b 4b mission}
FAM=()
[ -n "$FAMILY" ] && FAM=(--family "$FAMILY")
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
pack() { tar -czf "$OUT/results.tar.gz" -C "$R" . ; }
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv > "$R/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" >> "$R/gpu.txt"
for part in $PARTS; do
  start=$(date +%s)
  case $part in
    26b) python3 bench/train_bench.py --device cuda "${FAM[@]}" --steps 5 --warmup 2 \
           --plan "26b=eval,fast@4x1,fast@8x4,compile@8x4,fast@16x2" --eval-images 32 --eval-generate 2 \
           --out "$R/run3_26b.json" > "$R/run3_26b.log" 2>&1 ;;
    4b) python3 bench/train_bench.py --device cuda --steps 5 --warmup 2 \
           --plan "4b=fast@32x1,fast@64x1" --out "$R/run3_4b.json" > "$R/run3_4b.log" 2>&1 ;;
    mission) python3 experiments/multi_gpu.py --out "$R/mission" --gpus 1 --steps 60 --only ddp --preset 26b \
           "${FAM[@]}" > "$R/mission.log" 2>&1 ;;
  esac
  echo "$part: exit $? in $(( $(date +%s) - start )) s" | tee -a "$R/parts.txt"
  pack
done
tail -n 12 "$R"/run3_*.log 2>/dev/null
cat "$R/mission/multi_gpu.json" 2>/dev/null | head -40
