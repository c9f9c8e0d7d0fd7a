#!/usr/bin/env bash
# The device run of issue 17 (docs/performance.md, "Fast defaults"):   bash bench/device_run.sh OUT
# On one H200 the parts run one after another; with two GPUs, GPU 0 runs the 26B benchmark while
# GPU 1 runs the 4B benchmark and then the mission's command, and the DDP-vs-FSDP2 pair follows
# on both GPUs. Parts:
#   26b      bench at the 26B shape: evaluation forward path; the loop's on-device step compiled
#            at micro-batch 4 x 1, 8 x 4, 16 x 2; the older compiled step at 8 x 4
#   4b       bench at the 4B shape: the loop's compiled step at 32 x 1 and 64 x 1
#   mission  train_dpo.py --cfg configs/v8.yaml as typed (its defaults) at the 26B shape, one GPU,
#            through experiments/multi_gpu.py (60 steps)
#   multi    (2 GPUs) DDP and FSDP2 at the 26B shape, both compiled, micro-batch 8 x 4
# Everything lands in OUT/results.tar.gz (the device tool returns at most 8 files).
set -uo pipefail
OUT=${1:?usage: device_run.sh OUT}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
pack() { tar -czf "$OUT/results.tar.gz" -C "$R" . ; }
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv > "$R/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" >> "$R/gpu.txt"
run_part() {  # NAME GPU
  local start=$(date +%s) rc
  case $1 in
    26b) CUDA_VISIBLE_DEVICES=$2 python3 bench/train_bench.py --device cuda --steps 5 --warmup 2 \
           --plan "26b=eval,fast@4x1,fast@8x4,compile@8x4,fast@16x2" --eval-images 32 --eval-generate 2 \
           --out "$R/run3_26b.json" > "$R/run3_26b.log" 2>&1 ;;
    4b) CUDA_VISIBLE_DEVICES=$2 python3 bench/train_bench.py --device cuda --steps 5 --warmup 2 \
           --plan "4b=fast@32x1,fast@64x1" --out "$R/run3_4b.json" > "$R/run3_4b.log" 2>&1 ;;
    mission) CUDA_VISIBLE_DEVICES=$2 python3 experiments/multi_gpu.py --out "$R/mission" --gpus 1 --steps 60 \
           --only ddp --preset 26b > "$R/mission.log" 2>&1 ;;
    multi) python3 -m torch.distributed.run --nproc_per_node 2 bench/train_bench.py --device cuda --steps 5 \
           --warmup 2 --plan "26b=ddpfast@8x4,fsdpfast@8x4" --collective-timeout 300 \
           --out "$R/run3_multi.json" > "$R/run3_multi.log" 2>&1 ;;
  esac
  rc=$?
  echo "$1 on GPU $2: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$R/parts.txt"
}
if [ "$GPUS" -ge 2 ]; then
  run_part 26b 0 &
  (run_part 4b 1; run_part mission 1)
  wait
  pack
  run_part multi 0,1
else
  for part in 26b 4b mission; do run_part $part 0; pack; done
fi
pack
grep -h -E "samples/s/GPU|eval: forward|failed|Error" "$R"/run3_*.log | head -40
grep -h -A12 '"ddp1"' "$R/mission/multi_gpu.json" 2>/dev/null
