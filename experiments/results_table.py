"""The results table of docs/results.md: every recipe x 3 training seeds on the demo's benchmark.

    python experiments/results_table.py --work runs/table --jobs 2                  # CPU, ~27 min on 2 cores
    python experiments/results_table.py --work runs/table --jobs 14 --device cuda   # one GPU, 16 cores
    ... --dtype float32          # the whole run in float32 (on CUDA: no bf16 autocast)

Steps, all through the suite's own commands (each command is recorded beside its numbers):
  1. the benchmark: the baseline (assets/baseline, or --baseline), synthetic data and curated
     pairs, exactly as `python -m sa2va.demo` makes them, with --n-test held-out images (>= 200);
  2. every recipe of RECIPES with training seeds 0, 1, 2 (train_dpo.py, in parallel);
  3. evaluate.py of the baseline and of every trained model on the held-out images;
  4. per recipe: the mean over seeds of Dice and clDice, and paired comparisons of the per-image
     metric averaged over the 3 seeds against continued SFT (the control) and against the
     baseline (bootstrap CI, Wilcoxon p, images needed). docs/results.json holds, per row,
     recipe, kind, dice, cldice, vs_sft, vs_baseline and the commands; the CIs, images needed
     and per-seed numbers go to docs/results_details.json;
  5. SAM2's mask choice of the baseline and of each recipe's seed-0 model on --choice-images
     held-out images, float32 vs bf16 autocast (sa2va.baseline.mask_choice), in the details.

Learning rates: the seed's 1e-6 (v8) on a 26B model moves nothing on the tiny model, so every
rate is scaled by 100 (1e-4), the same for every recipe.
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

from sa2va.fileio import write_json  # noqa: E402
from sa2va.metrics import paired_compare  # noqa: E402

LR = "optim.lr=1e-4"
SMALL = ["lora.r=8", "lora.alpha=16", "optim.weight_decay=0", LR]
SFT_TERMS = ["loss.bce=2.0", "loss.dice=0.5"]  # the official supervised weights
# name: (config, overrides, kind, description)
RECIPES: dict[str, tuple[str, list[str], str, str]] = {
    "sft": ("configs/v8.yaml", ["loss.dice_dpo=0", *SFT_TERMS, *SMALL], "supervised",
            "continued SFT, 2.0 BCE + 0.5 Dice (the control)"),
    "v8": ("configs/v8.yaml", [LR], "preference", "the seed's Dice-DPO + 1.0 Dice"),
    "mask_dpo+dice": ("configs/v8.yaml", ["loss.dice_dpo=0", "loss.mask_dpo=1.0", "loss.dice=1.0", *SMALL],
                      "preference", "offline mask DPO + 1.0 Dice"),
    "online_dpo": ("configs/online_dpo.yaml", ["loss.dice=0", LR], "preference",
                   "online mask DPO alone (rejected masks remade every 10 steps)"),
    "online_dpo+dice": ("configs/online_dpo.yaml", [LR], "preference", "online mask DPO + 1.0 Dice"),
    "grpo": ("configs/grpo.yaml", [LR], "reward", "mask GRPO, Dice reward, 8 samples, KL 0.05"),
    "grpo+sft": ("configs/grpo.yaml", [*SFT_TERMS, LR], "reward", "mask GRPO + 2.0 BCE + 0.5 Dice"),
}
# The same for every run: 4 pairs per optimizer step as the seed (1 x 4, run as micro-batch 4),
# --epochs passes (the table: one) of at most 500 pairs, no held-out evaluation during training (the table evaluates).
COMMON = ["train.micro_batch_size=4", "train.grad_accum=1", "data.max_samples=500",
          "train.save_every=0", "train.eval_every=0", "data.val_root=null"]
METRICS = ("dice", "cldice")
SEEDS = (0, 1, 2)


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def shown(cmd: list[str], work: Path) -> str:
    return (" ".join(cmd).replace(sys.executable, "python").replace(str(work), "runs/table")
            .replace(str(REPO) + "/", ""))


def compare(per_image_a: dict, per_image_b: dict, names: list[str], metric: str, a: str, b: str) -> dict:
    cmp = paired_compare({n: per_image_a[n] for n in names}, {n: per_image_b[n] for n in names},
                         metric=metric, name_a=a, name_b=b)
    return {"diff": cmp["mean_diff"], "p": cmp["p"], "ci_low": cmp["ci_low"], "ci_high": cmp["ci_high"],
            "n_needed": cmp["n_needed"], "sentence": cmp["sentence"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/table")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--baseline", default=str(REPO / "assets" / "baseline"))
    parser.add_argument("--n-test", type=int, default=200, help="held-out images (>= 200 for the table)")
    parser.add_argument("--n-train", type=int, default=200, help="images for the pairs (a smaller run: a dry run)")
    parser.add_argument("--results", default="docs/results.json")
    parser.add_argument("--details", default="docs/results_details.json")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32"),
                        help="auto: bf16 weights and autocast on CUDA; float32: the whole run in float32")
    parser.add_argument("--epochs", type=int, default=1,
                        help="passes over the pairs for every recipe (the table: 1; a longer schedule: more)")
    parser.add_argument("--choice-images", type=int, default=16,
                        help="held-out images on which each recipe's seed-0 model's mask choice is checked")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    py = sys.executable
    recipes = args.recipes.split(",")
    if "sft" not in recipes:
        raise SystemExit("--recipes must include sft (the control every row is compared with)")

    # 1. The demo's benchmark (baseline, data, pairs): the demo stopped after curation.
    bench = work / "bench"
    bench_cmd = [py, "-m", "sa2va.demo", "--out", str(bench), "--baseline", str(args.baseline),
                 "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--stop-after", "pairs"]
    if not (bench / "pairs" / "dpo_annotations.json").is_file():
        shutil.rmtree(bench, ignore_errors=True)
        run(bench_cmd, work / "logs" / "bench.log")
    baseline, pairs = bench / "baseline", bench / "pairs"

    # 2. Training: every recipe x seed, in parallel.
    jobs = []
    for name in recipes:
        cfg, extra, _, _ = RECIPES[name]
        for seed in SEEDS:
            out = work / "runs" / f"{name}_s{seed}"
            cmd = [py, "train_dpo.py", "--cfg", cfg, f"model.path={baseline}", f"data.root={pairs}",
                   f"output_dir={out}", f"train.seed={seed}", f"device={args.device}", f"model.dtype={args.dtype}",
                   f"train.epochs={args.epochs}", *COMMON, *extra]
            jobs.append((name, seed, out, cmd))
    commands: dict[str, list[str]] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = []
        for name, seed, out, cmd in jobs:
            commands.setdefault(name, []).append(shown(cmd, work))
            if not (out / "final" / "model.safetensors").is_file():
                shutil.rmtree(out, ignore_errors=True)
                futures.append(pool.submit(run, cmd, work / "logs" / f"train_{name}_s{seed}.log"))
        for f in futures:
            f.result()

    # 3. Evaluation on the held-out images.
    def evaluate(model: Path, out: Path, tag: str) -> list[str]:
        cmd = [py, "evaluate.py", "--model", str(model), "--data", str(pairs), "--out", str(out),
               "--trust-remote-code", "--device", args.device, "--dtype", args.dtype, "--batch-size", "8"]
        if not (out / "results.json").is_file():
            run(cmd, work / "logs" / f"eval_{tag}.log")
        return cmd

    evals = work / "eval"
    with ThreadPoolExecutor(args.jobs) as pool:
        base_future = pool.submit(evaluate, baseline, evals / "baseline", "baseline")
        eval_futures = {(name, seed): pool.submit(evaluate, out / "final", evals / f"{name}_s{seed}", f"{name}_s{seed}")
                        for name, seed, out, _ in jobs}
        base_cmd = shown(base_future.result(), work)
        eval_cmds = {k: shown(f.result(), work) for k, f in eval_futures.items()}

    # 4. The table: per-image metrics averaged over seeds, compared image by image.
    base = json.loads((evals / "baseline" / "results.json").read_text())
    names = sorted(base["per_image"])
    choices = mask_choices({"baseline": baseline, **{n: work / "runs" / f"{n}_s0" / "final" for n in recipes}},
                           held_out_images(pairs)[: args.choice_images], args.device)
    per_image = {"baseline": {m: {n: base["per_image"][n][m] for n in names} for m in METRICS}}
    seed_means: dict[str, dict[str, list[float]]] = {}
    for name in recipes:
        runs = [json.loads((evals / f"{name}_s{s}" / "results.json").read_text()) for s in SEEDS]
        per_image[name] = {m: {n: float(np.mean([r["per_image"][n][m] for r in runs])) for n in names}
                           for m in METRICS}
        seed_means[name] = {m: [r["metrics"][m]["mean"] for r in runs] for m in METRICS}

    rows, details = [], []
    for name in ["baseline", *recipes]:
        row = {"recipe": name, "kind": "baseline" if name == "baseline" else RECIPES[name][2]}
        detail: dict = {"recipe": name, "n_images": len(names),
                        "description": "the converged baseline" if name == "baseline" else RECIPES[name][3]}
        for m in METRICS:
            row[m] = float(np.mean(list(per_image[name][m].values())))
        for key, other in (("vs_sft", "sft"), ("vs_baseline", "baseline")):
            if name == other:
                row[key] = None
                continue
            full = {m: compare(per_image[other][m], per_image[name][m], names, m, other, name) for m in METRICS}
            row[key] = {m: {"diff": full[m]["diff"], "p": full[m]["p"]} for m in METRICS}
            detail[key] = full
        row["commands"] = [base_cmd] if name == "baseline" else commands[name] + [eval_cmds[(name, s)] for s in SEEDS]
        detail["mask_choice_seed0"] = choices[name]
        if name != "baseline":
            detail["seed_means"] = seed_means[name]
        rows.append(row)
        details.append(detail)
    bench_shown = shown(bench_cmd, work)
    table_cmd = shown([py, *sys.argv], work)
    write_json(args.results, {"rows": rows, "commands": [bench_shown, table_cmd]})
    write_json(args.details, details)
    print(markdown(rows, details))
    for name, c in choices.items():
        print(f"mask choice ({name}, seed 0, {len(c['chosen_float32'])} images): float32 and bf16 agree: {c['agree']}, "
              f"IoU-head margin min {c['margin_min']:.4f}, median {c['margin_median']:.4f}")


def held_out_images(pairs: Path) -> list[Path]:
    images = json.loads((pairs / "holdout.json").read_text())["images"]
    return [p if p.is_absolute() else pairs / p for p in map(Path, images)]


def mask_choices(models: dict[str, Path], images: list[Path], device: str) -> dict[str, dict]:
    """SAM2's mask choice of each model on `images`, float32 vs bf16 autocast (sa2va.baseline.mask_choice).
    The recipes freeze the IoU head but train the decoder that feeds it, so its ranking can move."""
    from PIL import Image

    from sa2va.baseline import mask_choice
    from sa2va.checkpoint import load_for_inference

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    out = {}
    for name, path in models.items():
        sa2va = load_for_inference(path, True, device=device, dtype="float32")
        out[name] = mask_choice(sa2va, arrays)
    return out


def markdown(rows: list[dict], details: list[dict]) -> str:
    lines = ["| recipe | kind | Dice | clDice | Dice vs SFT (95% CI), p | clDice vs SFT (95% CI), p | images needed (Dice, clDice) | Dice vs baseline, p | clDice vs baseline, p |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(d: dict) -> str:
        return f"{d['diff']:+.4f} ({d['ci_low']:+.4f} to {d['ci_high']:+.4f}), p {d['p']:.2g}"

    for row, detail in zip(rows, details):
        sft = detail.get("vs_sft")
        bl = detail.get("vs_baseline")
        vs_sft = [cell(sft[m]) for m in METRICS] if sft else ["", ""]
        needed = f"{sft['dice']['n_needed']}, {sft['cldice']['n_needed']}" if sft else ""
        vs_bl = [f"{bl[m]['diff']:+.4f}, p {bl[m]['p']:.2g}" for m in METRICS] if bl else ["", ""]
        lines.append(f"| {row['recipe']} | {row['kind']} | {row['dice']:.4f} | {row['cldice']:.4f} | "
                     f"{' | '.join(vs_sft)} | {needed} | {' | '.join(vs_bl)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
