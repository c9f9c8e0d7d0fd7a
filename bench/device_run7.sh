#!/usr/bin/env bash
# Run 7 of issue 17 (docs/performance.md): one nvidia-h200, each part in its own process.
#   bash bench/device_run7.sh OUT
#   eval     26B evaluation forward path, InternLM2 attention through SDPA: eager, then the LLM and
#            ViT blocks compiled (evalc); 8 images also through the generate path (agreement)
#   train    26B training step compiled, SDPA attention: 16 x 2, 8 x 4, 24 x 2
#   eager    the same at 16 x 2 with the release's eager attention (SA2VA_DPO_ATTENTION=eager)
#   fp32     the eval part's agreement check in float32 (no bf16 autocast, no TF32), eager blocks
set -uo pipefail
OUT=${1:?usage: device_run7.sh OUT}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv > "$R/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" >> "$R/gpu.txt"
B="python3 bench/train_bench.py --device cuda --steps 5 --warmup 2"
part() {  # NAME LIMIT_S ARGS...
  local name=$1 limit=$2 start=$(date +%s) rc
  shift 2
  timeout "$limit" "$@" > "$R/run7_$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$R/parts.txt"
  tar -czf "$OUT/results.tar.gz" -C "$R" .
}
part eval 140 $B --plan "26b=eval,evalc" --eval-images 32 --eval-generate 8 --out "$R/run7_eval.json"
part train 170 $B --plan "26b=fast@16x2,fast@8x4,fast@24x2" --out "$R/run7_train.json"
part eager 90 env SA2VA_DPO_ATTENTION=eager $B --plan "26b=fast@16x2" --out "$R/run7_eager.json"
part fp32 140 $B --plan "26b=eval" --dtype float32 --eval-images 8 --eval-generate 8 --eval-batch 4 \
  --out "$R/run7_fp32.json"
grep -h -E "samples/s/GPU|forward|failed|Error|agreement" "$R"/run7_*.log | head -40
