#!/usr/bin/env bash
# Train the Qwen-VL vision merger on CUDA (train_modules.mlp1=true), export, both evaluation paths.
#   bash experiments/qwen_vl_merger_gpu.sh OUT PAIRS     (docs/families.md; PAIRS: any curated pairs folder)
# The device needs qwen-vl-utils (carry its wheel: pip download --no-deps qwen-vl-utils==0.0.14 -d .whl).
set -uo pipefail
OUT=$1; PAIRS=$2; export PYTHONUNBUFFERED=1
python3 -c "import qwen_vl_utils" 2>/dev/null || python3 -m pip install --no-deps -q .whl/*.whl > /dev/null 2>&1
python3 -m sa2va.tiny --out /tmp/q --family qwen2_5_vl > $OUT/merger.log 2>&1
python3 patch_sam2.py /tmp/q >> $OUT/merger.log 2>&1
python3 train_dpo.py --cfg tiny model.path=/tmp/q data.root=$PAIRS output_dir=/tmp/qr max_steps=4 \
    train.micro_batch_size=2 train.save_every=0 train_modules.mlp1=true device=cuda >> $OUT/merger.log 2>&1
echo "train rc=$?" >> $OUT/merger.log
python3 -m sa2va.synth --out /tmp/d8 --n 8 --size 128 --seed 5 > /dev/null 2>&1
python3 evaluate.py --model /tmp/qr/final --data /tmp/d8 --trust-remote-code --path both --device cuda --out /tmp/qe >> $OUT/merger.log 2>&1
echo "eval rc=$?" >> $OUT/merger.log
cp /tmp/qe/results.json $OUT/merger_eval.json 2>/dev/null
grep -v "Loading weights" $OUT/merger.log | tail -40
