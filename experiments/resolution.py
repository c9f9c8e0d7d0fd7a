"""Native resolution measured (docs/resolution.md, docs/resolution.json).

    python experiments/resolution.py --work runs/resolution --device cuda --n-train 64 --steps 250 \
        --workers 8 --threads 2 --eval-batch 128 --docs                       # one H200: 130 s
    python experiments/resolution.py --work runs/res_small --device cpu --n-train 8 --n-test 4 \
        --steps 4 --seeds 0                                                    # a smoke run on CPU

Steps, through the suite's own commands:
  1. data: realistic-width synthetic fundus images at DRIVE's 565x584 (the generator's
     --width-px realistic), a training set (pairs: chosen = truth; rejected = the truth dilated,
     unused by the supervised loss) and a held-out test set, from separate seeds;
  2. the resolution ceiling of the test set (evaluate.py --ceiling), at the tiny model's logit
     grid (512 -> 128) and at the release's (1024 -> 256), untiled and with tiles of the grid side;
  3. the shipped baseline (assets/baseline) supervised-trained (2.0 BCE + 0.5 Dice) with
     train_dpo.py untiled and with tiling.size=auto, seeds 0, 1, 2, the same steps and
     micro-batch for both (runs in parallel on one device);
  4. evaluate.py of each trained model on the test set, untiled models untiled and tiled models
     with the same tiles; the paired comparison (evaluate.py's statistics) of the per-image Dice
     averaged over seeds, the p of each seed alone, and the time per image of each path.
Writes WORK/resolution.json (and with --docs, docs/resolution.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sa2va.metrics import paired_compare  # noqa: E402

BASELINE = REPO / "assets" / "baseline"
SFT = ["loss.dice_dpo=0", "loss.mask_dpo=0", "loss.bce=2.0", "loss.dice=0.5", "lora.r=8", "lora.alpha=16",
       "optim.weight_decay=0", "optim.warmup_ratio=0.05", "train.grad_accum=1", "train.save_every=0",
       "train.eval_every=0", "data.val_root=null", "data.max_samples=null", "train.epochs=1000",
       "model.trust_remote_code=true"]


def _sample(job: tuple[str, int, int, int, int, bool]) -> None:
    from scipy import ndimage

    from sa2va.fileio import write_mask, write_png
    from sa2va.synth import make_sample, sample_name

    root, seed, index, height, width, pairs = job
    image, mask, fov = make_sample(seed, index, height, "realistic", width)
    name = sample_name(index) + ".png"
    write_png(Path(root) / "images" / name, image)
    write_mask(Path(root) / "masks" / name, mask)
    write_mask(Path(root) / "fov" / name, fov)
    if pairs:
        write_mask(Path(root) / "rejected_masks" / name, ndimage.binary_dilation(mask, iterations=2))


def make_data(root: Path, n: int, seed: int, height: int, width: int, pairs: bool, processes: int) -> Path:
    """The same samples as `python -m sa2va.synth --size WxH --width-px realistic --seed S`, in parallel."""
    from sa2va.synth import sample_name

    if (root / "images").is_dir() and len(list((root / "images").glob("*.png"))) == n:
        return root
    for sub in ("images", "masks", "fov") + (("rejected_masks",) if pairs else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with Pool(processes) as pool:
        pool.map(_sample, [(str(root), seed, i, height, width, pairs) for i in range(n)])
    if pairs:
        names = [sample_name(i) + ".png" for i in range(n)]
        (root / "dpo_annotations.json").write_text(json.dumps(
            [{"image": f"images/{x}", "chosen_mask": f"masks/{x}", "rejected_mask": f"rejected_masks/{x}"}
             for x in names]))
    return root


def run(cmd: list[str], log: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    shown = " ".join(cmd).replace(sys.executable, "python")
    started = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shown}\n" + log.read_text()[-3000:])
    return time.perf_counter() - started


def parallel(jobs: list[tuple[list[str], Path, Path]], workers: int, threads: int) -> list[float]:
    """Run the jobs side by side; a job whose output file exists already is skipped (re-runs resume)."""
    jobs = [(cmd, log) for cmd, log, done in jobs if not done.exists()]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda j: run(j[0], j[1], threads), jobs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/resolution")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", default="565x584", help="WxH of the synthetic images")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16, help="pairs (untiled) or tile pairs (tiled) per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tile-overlap", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=64, help="images (untiled) or tiles (tiled) per forward")
    p.add_argument("--workers", type=int, default=6, help="commands run side by side")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per command")
    p.add_argument("--timing-images", type=int, default=10, help="test images timed per path")
    p.add_argument("--docs", action="store_true", help="also write docs/resolution.json")
    p.add_argument("--assemble", action="store_true", help="only (re)build resolution.json from WORK")
    args = p.parse_args()
    work = Path(args.work).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.split("x"))
    seeds = [int(s) for s in args.seeds.split(",")]
    py = sys.executable
    started = time.perf_counter()
    if args.assemble:
        assemble(work, seeds, args, started)
        return 0

    procs = max(1, (os.cpu_count() or 2) - 1)
    train_dir = make_data(work / "train", args.n_train, 11, height, width, True, procs)
    test_dir = make_data(work / "test", args.n_test, 12, height, width, False, procs)
    print(f"data: {args.n_train} training and {args.n_test} test images at {width}x{height} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    variants = {"untiled": ["tiling.size=null"],
                "tiled": ["tiling.size=auto", f"tiling.overlap={args.tile_overlap}"]}
    jobs, ceilings = [], {"tiny": ["--model", str(BASELINE)], "release": []}
    for name, extra in ceilings.items():
        jobs.append(([py, "evaluate.py", "--ceiling", "--data", str(test_dir), "--out", str(work / f"ceiling_{name}"),
                      "--tile-size", "auto", "--tile-overlap", str(args.tile_overlap), *extra],
                     work / "logs" / f"ceiling_{name}.log", work / f"ceiling_{name}" / "results.json"))
    for variant, extra in variants.items():
        for seed in seeds:
            jobs.append(([py, "train_dpo.py", "--cfg", "tiny", f"model.path={BASELINE}", f"data.root={train_dir}",
                          f"output_dir={work / f'{variant}_s{seed}'}", f"device={args.device}", f"train.seed={seed}",
                          f"max_steps={args.steps}", f"train.micro_batch_size={args.batch}", f"optim.lr={args.lr:g}",
                          *SFT, *extra], work / "logs" / f"train_{variant}_s{seed}.log",
                         work / f"{variant}_s{seed}" / "final" / "config.json"))
    parallel(jobs, args.workers, args.threads)
    print(f"ceilings and {2 * len(seeds)} training runs ({time.perf_counter() - started:.0f} s)", flush=True)

    jobs = []
    for variant in variants:
        tiles = ["--tile-size", "auto", "--tile-overlap", str(args.tile_overlap)] if variant == "tiled" else \
            ["--tile-size", "off"]
        for seed in seeds:
            jobs.append(([py, "evaluate.py", "--model", str(work / f"{variant}_s{seed}" / "final"), "--data",
                          str(test_dir), "--out", str(work / f"eval_{variant}_s{seed}"), "--trust-remote-code",
                          "--device", args.device, "--batch-size", str(args.eval_batch), "--n-boot", "1000", *tiles],
                         work / "logs" / f"eval_{variant}_s{seed}.log",
                         work / f"eval_{variant}_s{seed}" / "results.json"))
    parallel(jobs, args.workers, args.threads)
    print(f"evaluations ({time.perf_counter() - started:.0f} s)", flush=True)

    if not (work / "timing.json").exists():
        timing(work, test_dir, seeds[0], args)
    assemble(work, seeds, args, started)
    return 0


def timing(work: Path, test_dir: Path, seed: int, args: argparse.Namespace) -> None:
    """Seconds per image of the forward path, untiled and tiled, for the same trained model, in one
    process after a warm-up (the evaluations above ran side by side, so their clocks are shared)."""
    import torch

    from sa2va import tiling
    from sa2va.fileio import read_rgb
    from sa2va.model import load_sa2va

    sa2va = load_sa2va(work / f"tiled_s{seed}" / "final", trust_remote_code=True, device=args.device)
    images = [read_rgb(p) for p in sorted((test_dir / "images").glob("*.png"))[: args.timing_images]]
    tiles = tiling.resolve("auto", args.tile_overlap, sa2va.low_res)
    out = {"images": len(images), "device": args.device, "batch": args.eval_batch}
    for name, t in (("untiled", None), ("tiled", tiles)):
        tiling.predict_probabilities(sa2va, images[:2], t, batch_size=args.eval_batch)  # warm-up
        if sa2va.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tiling.predict_probabilities(sa2va, images, t, batch_size=args.eval_batch)
        if sa2va.device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / len(images)
    out["tiles_per_image"] = len(tiling.layout(images[0].shape[0], images[0].shape[1], tiles).boxes)
    (work / "timing.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"seconds per image: untiled {out['untiled']:.4f}, tiled {out['tiled']:.4f}", flush=True)


def assemble(work: Path, seeds: list[int], args: argparse.Namespace, started: float) -> None:
    variants = ("untiled", "tiled")
    ceilings = ("release", "tiny")
    timing = json.loads((work / "timing.json").read_text())
    results = {v: [json.loads((work / f"eval_{v}_s{s}" / "results.json").read_text()) for s in seeds]
               for v in variants}

    def per_image(variant: str, metric: str) -> dict[str, float]:
        names = results[variant][0]["per_image"].keys()
        return {n: float(np.mean([r["per_image"][n][metric] for r in results[variant]])) for n in names}

    compare = {m: paired_compare(per_image("untiled", m), per_image("tiled", m), metric=m, n_boot=5000, seed=0,
                                 name_a="untiled", name_b="tiled") for m in ("dice", "cldice")}
    per_seed_p = [paired_compare({n: r["per_image"][n]["dice"] for n in r["per_image"]},
                                 {n: t["per_image"][n]["dice"] for n in t["per_image"]}, metric="dice",
                                 n_boot=1000, seed=0)["p"]
                  for r, t in zip(results["untiled"], results["tiled"])]
    ceiling = {k: json.loads((work / f"ceiling_{k}" / "results.json").read_text())["ceiling"] for k in ceilings}
    mean = lambda v, m: [r["metrics"][m]["mean"] for r in results[v]]  # noqa: E731
    tile_log = (work / "logs" / f"train_tiled_s{seeds[0]}.log").read_text()
    doc = {
        # The release's grid (1024 -> 256): what a real Sa2VA can reach; the tiny grid is in details.
        "ceiling_dice_untiled": ceiling["release"]["untiled"]["metrics"]["dice"]["mean"],
        "ceiling_dice_tiled": ceiling["release"]["tiled"]["metrics"]["dice"]["mean"],
        "trained_dice_untiled": float(np.mean(mean("untiled", "dice"))),
        "trained_dice_tiled": float(np.mean(mean("tiled", "dice"))),
        "p_dice_tiled_vs_untiled": compare["dice"]["p"],
        "cost_ratio": timing["tiled"] / timing["untiled"],
        "details": {
            "ceiling": {k: {"logit_grid": c["logit_grid"], "sam_size": c["sam_size"], "tile_size": c["tiling"]["size"],
                            "tile_overlap": c["tiling"]["overlap"],
                            **{f"{m}_{t}": c[t]["metrics"][m]["mean"] for t in ("untiled", "tiled")
                               for m in ("dice", "cldice")}} for k, c in ceiling.items()},
            "trained": {v: {"dice_per_seed": mean(v, "dice"), "cldice_per_seed": mean(v, "cldice"),
                            "cldice": float(np.mean(mean(v, "cldice")))} for v in variants},
            "compare_seed_mean": {m: {k: c[k] for k in ("n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high",
                                                        "p", "significant", "sentence")}
                                  for m, c in compare.items()},
            "p_dice_per_seed": per_seed_p,
            "seconds_per_image": timing,
            "tile_pairs_line": next((line for line in tile_log.splitlines() if "tile pairs" in line), None),
            "setup": {"images": args.size, "widths": "realistic", "n_train": args.n_train, "n_test": args.n_test,
                      "train_seed": 11, "test_seed": 12, "steps": args.steps, "micro_batch": args.batch,
                      "lr": args.lr, "seeds": seeds, "tile_overlap": args.tile_overlap, "eval_batch": args.eval_batch,
                      "start": "assets/baseline", "loss": "2.0 BCE + 0.5 Dice", "device": args.device,
                      "total_seconds": time.perf_counter() - started},
        },
    }
    (work / "resolution.json").write_text(json.dumps(doc, indent=2) + "\n")
    if args.docs:
        (REPO / "docs" / "resolution.json").write_text(json.dumps(doc, indent=2) + "\n")
    keys = ("ceiling_dice_untiled", "ceiling_dice_tiled", "trained_dice_untiled", "trained_dice_tiled",
            "p_dice_tiled_vs_untiled", "cost_ratio")
    print(json.dumps({k: doc[k] for k in keys}, indent=2))
    print(compare["dice"]["sentence"])
    print(f"total {time.perf_counter() - started:.0f} s; wrote {work / 'resolution.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
