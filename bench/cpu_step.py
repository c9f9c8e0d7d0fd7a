"""Time one optimizer step of configs/tiny.yaml on the CPU (issue: well under 1 s).

    python bench/cpu_step.py [--steps 30] [--threads 2]

Builds the tiny checkpoint and 16 synthetic pairs in a temporary folder, runs the real
`train_dpo.py --cfg tiny` for --steps optimizer steps, and prints the step times it logged
(metrics.jsonl: samples_per_s with micro-batch 2 x accumulation 1). Nothing is asserted.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from sa2va.synth import write_dilated_pairs
    from sa2va.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_tiny_checkpoint(work / "tiny")
        data = write_dilated_pairs(work / "data", n=16, size=128, seed=0)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, "train_dpo.py", "--cfg", "tiny", f"model.path={model}", f"data.root={data}",
                        f"output_dir={work / 'run'}", f"max_steps={args.steps}", "train.save_every=0"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    batch = 2  # configs/tiny.yaml: micro_batch_size 2 x grad_accum 1
    times = [batch / r["samples_per_s"] for r in records[3:]]  # the first steps warm up
    print(f"configs/tiny.yaml on CPU ({args.threads} threads), {len(times)} steps after 3 warm-up steps:")
    print(f"  optimizer step: median {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
          f"(forward + backward of LLM, text_hidden_fcs and mask decoder at 2 pairs, loss at 128 px, AdamW)")


if __name__ == "__main__":
    main()
