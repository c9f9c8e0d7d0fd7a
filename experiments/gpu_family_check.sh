#!/usr/bin/env bash
# Both evaluation paths of every tiny family on CUDA (the release-style predict_forward on the GPU).
#   bash experiments/gpu_family_check.sh OUT     (docs/families.md, "Both evaluation paths on the GPU")
set -uo pipefail
OUT=$1
export PYTHONUNBUFFERED=1
python3 -c "import skimage, scipy; print('skimage', skimage.__version__)" || echo "NO SKIMAGE"
python3 -m sa2va.synth --out /tmp/d --n 8 --size 128 --seed 5 > /dev/null
for fam in qwen2_5_vl qwen3_vl internlm2 qwen2; do
  echo "=== $fam"
  python3 -m sa2va.tiny --out /tmp/m_$fam --family $fam > $OUT/tiny_$fam.log 2>&1 || { tail -5 $OUT/tiny_$fam.log; continue; }
  python3 evaluate.py --model /tmp/m_$fam --data /tmp/d --trust-remote-code --path both --device cuda \
      --out /tmp/e_$fam > $OUT/eval_$fam.log 2>&1; echo "rc=$?"
  tail -25 $OUT/eval_$fam.log
  cp /tmp/e_$fam/results.json $OUT/results_$fam.json 2>/dev/null
done
