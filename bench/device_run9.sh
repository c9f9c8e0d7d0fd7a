#!/usr/bin/env bash
# Run 9 (nvidia-h200-x2): FSDP2 with dist.fsdp_gather=per_step against DDP and FSDP2 per_use at the
# 26B shape, 2 GPUs, the same micro-batch (issue 17's fsdp_vs_ddp_per_gpu).
#   bash bench/device_run9.sh OUT
set -uo pipefail
R=$1; export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m torch.distributed.run --nproc_per_node 2 bench/train_bench.py --device cuda --steps 5 --warmup 2 \
    --plan "26b=ddpfast@8x4,fsdpfast@8x4,fsdpstep@8x4" --collective-timeout 300 \
    --out "$R/h200x2_run9_multi.json" > "$R/h200x2_run9_multi.log" 2>&1
echo "multi on GPU 0,1: exit $? in $(( $(date +%s) - start )) s" | tee "$R/h200x2_run9_parts.txt"
tail -20 "$R/h200x2_run9_multi.log"
