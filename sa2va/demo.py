"""The main job on the embedded default: curate, train and evaluate end to end.

    python -m sa2va.demo [--out runs/demo] [--n-train 200] [--n-test 100] [--seed 0]

It runs the suite's own commands in order, as a user would type them, and keeps every
artefact in OUT:
  1. baseline/   the baseline Sa2VA-format model (shipped under assets/, or rebuilt)
  2. data/       synthetic vessel images (python -m sa2va.synth)
  3. pairs/      preference pairs from the baseline's own predictions (curate_data.py, min gap
                 0.1) on the training split; the held-out split never enters them
  4. train/      preference training (train_dpo.py --cfg configs/demo.yaml)
  5. eval/       evaluate.py of the baseline and the trained model on the held-out split
  6. compare.json  evaluate.py --compare: paired differences, CIs, Wilcoxon p
  7. plots/      training curves and held-out Dice over steps (PNG)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from .errors import UserError, run_cli

REPO = Path(__file__).resolve().parent.parent
SHIPPED_BASELINE = REPO / "assets" / "baseline"
console = Console()


def step(title: str, cmd: list[str]) -> None:
    """Run one of the suite's commands, showing it as a user would type it."""
    shown = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
    console.rule(f"[bold]{title}")
    console.print(f"[dim]$ {shown}")
    started = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO)
    if proc.returncode != 0:
        raise UserError(f"step '{title}' failed (exit {proc.returncode}): {shown}")
    console.print(f"[dim]({time.perf_counter() - started:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (must be new or empty, or use --overwrite)")
    parser.add_argument("--n-train", type=int, default=200, help="images for preference pairs")
    parser.add_argument("--n-test", type=int, default=100, help="held-out images for evaluation (>= 100 recommended)")
    parser.add_argument("--size", type=int, default=128, help="synthetic image size")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the baseline never saw these images)")
    parser.add_argument("--cfg", default="configs/demo.yaml", help="training recipe")
    parser.add_argument("--min-gap", type=float, default=0.1,
                        help="curation gap rule (the converged baseline's masks are within 0.15 of the truth)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--baseline", default=str(SHIPPED_BASELINE),
                        help="the baseline model folder (default: the shipped assets/baseline; rebuilt if missing)")
    parser.add_argument("--stop-after", choices=("pairs", "train"), help="stop after this step (for experiments)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for train_dpo.py")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.n_train < 8 or args.n_test < 1:
        raise UserError("--n-train must be >= 8 and --n-test >= 1")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UserError(f"{out} is not empty: choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    py = sys.executable
    started = time.perf_counter()

    baseline = out / "baseline"
    source = Path(args.baseline)
    if (source / "model.safetensors").is_file():
        console.rule("[bold]1. baseline")
        shutil.copytree(source, baseline)
        report_file = baseline / "baseline_report.json"
        built = json.loads(report_file.read_text()) if report_file.is_file() else None
        console.print(f"baseline {source}" + (f": held-out Dice {built['val_dice_mean']:.3f} when built "
                                              f"({built['command']})" if built else ""))
    else:
        step("1. baseline (not shipped: building it)", [py, "-m", "sa2va.baseline", "--out", baseline])

    data = out / "data"
    n = args.n_train + args.n_test
    step("2. synthetic data", [py, "-m", "sa2va.synth", "--out", data, "--n", n, "--size", args.size,
                               "--seed", 100 + args.seed])
    names = sorted(p.stem for p in (data / "images").glob("*.png"))
    holdout_file = out / "holdout_ids.json"
    holdout_file.write_text(json.dumps(names[args.n_train:]) + "\n")

    pairs = out / "pairs"
    step("3. preference pairs from the baseline's own predictions",
         [py, "curate_data.py", "--data", data, "--out", pairs, "--model", baseline, "--trust-remote-code",
          "--min-gap", args.min_gap, "--thresholds", "0.3,0.5,0.7", "--holdout-ids", holdout_file,
          "--seed", args.seed, "--device", "cpu"])

    if args.stop_after == "pairs":
        return 0
    train = out / "train"
    step("4. preference training",
         [py, "train_dpo.py", "--cfg", args.cfg, f"model.path={baseline}", f"data.root={pairs}",
          f"data.val_root={pairs}", f"output_dir={train}", *args.overrides])

    if args.stop_after == "train":
        return 0
    evals = out / "eval"
    for name, model in (("baseline", baseline), ("trained", train / "final")):
        step(f"5. evaluate the {name} model on the held-out images",
             [py, "evaluate.py", "--model", model, "--data", pairs, "--out", evals / name,
              "--trust-remote-code", "--overlays", "4", "--device", "cpu"])

    step("6. paired comparison",
         [py, "evaluate.py", "--compare", evals / "baseline" / "results.json", evals / "trained" / "results.json",
          "--json", out / "compare.json"])

    console.rule("[bold]7. plots")
    from .plots import plot_training

    for path in plot_training(train / "metrics.jsonl", out / "plots"):
        console.print(f"wrote {path.relative_to(out.parent)}")

    summarise(out, time.perf_counter() - started)
    return 0


def summarise(out: Path, seconds: float) -> None:
    compare = json.loads((out / "compare.json").read_text())
    console.rule("[bold]what happened")
    rows = compare.get("metrics", compare)
    for metric in ("dice", "cldice"):
        entry = rows.get(metric) if isinstance(rows, dict) else None
        if entry and "sentence" in entry:
            console.print(f"{metric}: {entry['sentence']}")
    console.print(f"Everything is in {out} ({seconds / 60:.1f} min): baseline/, data/, pairs/ "
                  f"(dpo_annotations.json, curation_report.json), train/ (metrics.jsonl, checkpoints/, final/), "
                  f"eval/ (results.json, per_image.csv, overlays/), compare.json, plots/.")


if __name__ == "__main__":
    run_cli(main)
