"""The results table of docs/results.md: every recipe x 3 training seeds on the demo's benchmark.

    python experiments/results_table.py --work runs/table --jobs 2          # ~1 h on 2 CPU cores
    python experiments/results_table.py --work runs/table --jobs 14         # a 16-core machine

Steps, all through the suite's own commands (each command is recorded beside its numbers):
  1. the benchmark: the shipped baseline, synthetic data and curated pairs, exactly as
     `python -m sa2va.demo` makes them (same seeds, sizes and curation options);
  2. every recipe of RECIPES with training seeds 0, 1, 2 (train_dpo.py, in parallel);
  3. evaluate.py of the baseline and of every trained model on the held-out images;
  4. per recipe: the mean over seeds of each metric, and a paired comparison against the
     baseline of the per-image metric averaged over the 3 seeds (bootstrap CI, Wilcoxon p),
     plus the Dice p of each seed alone; written to docs/results.json and a markdown table.

Learning rates: the seed's runs used 1e-6 (v6-v8), 5e-5 (v8b) and 1e-5 (v8c) on a 26B model.
On the tiny model 1e-6 moves nothing in 100 steps, so every rate is scaled by 100, keeping the
ratios between the runs (v8b is still 50x v8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sa2va.metrics import paired_compare  # noqa: E402

LR_SCALE = 100
RECIPES: dict[str, tuple[str, list[str], str]] = {
    "v6": ("configs/v6.yaml", [f"optim.lr={1e-6 * LR_SCALE:g}"], "Dice-DPO, LoRA only"),
    "v7": ("configs/v7.yaml", [f"optim.lr={1e-6 * LR_SCALE:g}"], "Dice-DPO, + text_hidden_fcs and mask decoder"),
    "v8": ("configs/v8.yaml", [f"optim.lr={1e-6 * LR_SCALE:g}"], "Dice-DPO + 1.0 Dice (the seed's hybrid)"),
    "v8b": ("configs/v8b.yaml", [f"optim.lr={5e-5 * LR_SCALE:g}"], "v8 at 50x the learning rate"),
    "v8c": ("configs/v8c.yaml", [f"optim.lr={1e-5 * LR_SCALE:g}"], "v8 at 10x the learning rate"),
    # The rows below ran on configs/demo.yaml when it held mask_dpo 1.0 + dice 1.0 (beta 0.2, LoRA r 8 /
    # alpha 16); it now holds v8's recipe, so they spell out every loss weight and the LoRA size.
    "mask_dpo": ("configs/v8.yaml", ["loss.dice_dpo=0", "loss.dice=0", "loss.mask_dpo=1.0", "lora.r=8", "lora.alpha=16",
                                     "optim.weight_decay=0", f"optim.lr={1e-6 * LR_SCALE:g}"], "true mask DPO alone"),
    "mask_dpo+dice": ("configs/v8.yaml", ["loss.dice_dpo=0", "loss.dice=1.0", "loss.mask_dpo=1.0", "lora.r=8",
                                          "lora.alpha=16", "optim.weight_decay=0", f"optim.lr={1e-6 * LR_SCALE:g}"],
                      "true mask DPO + 1.0 Dice"),
    "sft": ("configs/v8.yaml", ["loss.dice_dpo=0", "loss.bce=2.0", "loss.dice=0.5", "lora.r=8", "lora.alpha=16",
                                "optim.weight_decay=0", f"optim.lr={1e-6 * LR_SCALE:g}"],
            "supervised: 2.0 BCE + 0.5 Dice (official weights)"),
}
# The same for every run: CPU, 4 pairs per optimizer step as the seed (1 x 4), one epoch of at
# most 500 pairs, no held-out evaluation during training (the table evaluates afterwards).
COMMON = ["device=cpu", "train.micro_batch_size=4", "train.grad_accum=1", "train.epochs=1",
          "data.max_samples=500", "train.save_every=0", "train.eval_every=0", "data.val_root=null"]
METRICS = ("dice", "iou", "precision", "recall", "cldice")
SEEDS = (0, 1, 2)


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - started


def shown(cmd: list[str]) -> str:
    return " ".join(cmd).replace(sys.executable, "python").replace(str(REPO) + "/", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/table")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--results", default="docs/results.json")
    parser.add_argument("--bench", help="reuse the baseline/ and pairs/ of an existing demo output folder")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    py = sys.executable
    recipes = args.recipes.split(",")

    # 1. The demo's benchmark (baseline, data, pairs): run the demo with no training steps of its own.
    bench = Path(args.bench).resolve() if args.bench else work / "bench"
    if not (bench / "pairs" / "dpo_annotations.json").is_file():
        shutil.rmtree(bench, ignore_errors=True)
        run([py, "-m", "sa2va.demo", "--out", str(bench), "--stop-after", "pairs"], work / "logs" / "bench.log")
    baseline, pairs = bench / "baseline", bench / "pairs"

    # 2. Training: every recipe x seed, in parallel.
    jobs = []
    for name in recipes:
        cfg, extra, _ = RECIPES[name]
        for seed in SEEDS:
            out = work / "runs" / f"{name}_s{seed}"
            cmd = [py, "train_dpo.py", "--cfg", cfg, f"model.path={baseline}", f"data.root={pairs}",
                   f"output_dir={out}", f"train.seed={seed}", *COMMON, *extra]
            jobs.append((name, seed, out, cmd))
    commands: dict[str, list[str]] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = []
        for name, seed, out, cmd in jobs:
            commands.setdefault(name, []).append(shown(cmd))
            if not (out / "final" / "model.safetensors").is_file():
                shutil.rmtree(out, ignore_errors=True)
                futures.append(pool.submit(run, cmd, work / "logs" / f"train_{name}_s{seed}.log"))
        for f in futures:
            f.result()

    # 3. Evaluation on the held-out images.
    def evaluate(model: Path, out: Path, tag: str) -> list[str]:
        cmd = [py, "evaluate.py", "--model", str(model), "--data", str(pairs), "--out", str(out),
               "--trust-remote-code", "--device", "cpu", "--batch-size", "8"]
        if not (out / "results.json").is_file():
            run(cmd, work / "logs" / f"eval_{tag}.log")
        return cmd

    evals = work / "eval"
    with ThreadPoolExecutor(args.jobs) as pool:
        base_future = pool.submit(evaluate, baseline, evals / "baseline", "baseline")
        eval_futures = {(name, seed): pool.submit(evaluate, out / "final", evals / f"{name}_s{seed}", f"{name}_s{seed}")
                        for name, seed, out, _ in jobs}
        base_cmd = base_future.result()
        eval_cmds = {k: shown(f.result()) for k, f in eval_futures.items()}

    # 4. The table.
    base = json.loads((evals / "baseline" / "results.json").read_text())
    table = {"baseline": {"description": "the shipped baseline (supervised tiny Sa2VA)",
                          "n_images": base["n"],
                          **{m: {"mean": base["metrics"][m]["mean"], "ci_low": base["metrics"][m]["ci_low"],
                                 "ci_high": base["metrics"][m]["ci_high"]} for m in METRICS},
                          "command": shown(base_cmd)}}
    for name in recipes:
        per_seed = [json.loads((evals / f"{name}_s{seed}" / "results.json").read_text()) for seed in SEEDS]
        row: dict = {"description": RECIPES[name][2], "train_commands": commands[name],
                     "eval_commands": [eval_cmds[(name, s)] for s in SEEDS]}
        for m in METRICS:
            names = sorted(base["per_image"])
            averaged = {n: float(np.mean([r["per_image"][n][m] for r in per_seed])) for n in names}
            cmp = paired_compare({n: base["per_image"][n][m] for n in names}, averaged, metric=m,
                                 name_a="baseline", name_b=name)
            row[m] = {"mean": float(np.mean([r["metrics"][m]["mean"] for r in per_seed])),
                      "seed_means": [r["metrics"][m]["mean"] for r in per_seed],
                      "diff": cmp["mean_diff"], "diff_ci_low": cmp["ci_low"], "diff_ci_high": cmp["ci_high"],
                      "p": cmp["p"], "sentence": cmp["sentence"]}
        row["dice_p_per_seed"] = [
            paired_compare({n: base["per_image"][n]["dice"] for n in base["per_image"]},
                           {n: r["per_image"][n]["dice"] for n in base["per_image"]}, metric="dice")["p"]
            for r in per_seed]
        table[name] = row
    Path(args.results).write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))


def markdown(table: dict) -> str:
    lines = ["| recipe | Dice | IoU | precision | recall | clDice | Dice vs baseline (95% CI) | p (Dice) | p (clDice) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        cells = [f"{row[m]['mean']:.4f}" for m in METRICS]
        if name == "baseline":
            lines.append(f"| baseline | {' | '.join(cells)} | | | |")
            continue
        d = row["dice"]
        lines.append(f"| {name} | {' | '.join(cells)} | {d['diff']:+.4f} ({d['diff_ci_low']:+.4f} to "
                     f"{d['diff_ci_high']:+.4f}) | {d['p']:.2g} | {row['cldice']['p']:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
