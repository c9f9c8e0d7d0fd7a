"""Build DPO preference pairs (chosen = ground truth, rejected = a worse mask) from a data set.

    python curate_data.py [--data DIR] --min-gap 0.15 [--out OUT] [--rejected given,model,perturb]
                          [--model M] [--holdout 0.2] [--max-samples N] [--dry-run] ...

See docs/curation.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from sa2va.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from sa2va.curation import (
    ANNOTATIONS,
    DEFAULT_PERTURBATIONS,
    HOLDOUT,
    PERTURBATIONS,
    REPORT,
    SOURCES,
    Curation,
    Options,
    build_report,
    check_data_folder,
    curate,
    make_stage,
    plan_output,
    read_holdout_ids,
    text_histogram,
    write_outputs,
)
from sa2va.errors import UserError, run_cli
from sa2va.tiling import check_tiling, parse_size


def _list(kind: type, name: str):
    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a comma-separated list, got {text!r}") from None
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build DPO preference pairs: chosen = ground truth, rejected = a "
                                "worse mask, kept when gap = 1 - Dice(rejected, chosen) >= --min-gap.")
    p.add_argument("--data", help="data folder with images/ and masks/ (optional rejected_masks/, fov/); "
                   "default: data.root of configs/v8.yaml")
    p.add_argument("--min-gap", type=float, required=True, help="keep a pair only if its gap is >= this (0..1)")
    p.add_argument("--max-gap", type=float, default=1.0, help="drop pairs whose gap is above this (default 1)")
    p.add_argument("--out", help="output folder (default: the data folder)")
    p.add_argument("--rejected", type=_list(str, "--rejected"),
                   help=f"sources of rejected masks, comma-separated from {','.join(SOURCES)} (default: given if "
                   "DIR/rejected_masks exists, plus model when --model is given)")
    p.add_argument("--model", help="Sa2VA model folder for the model source")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow loading the model's own Python code (default: model.trust_remote_code of configs/v8.yaml)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (model source)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model forward (model source)")
    p.add_argument("--tile-size", help="model source at native resolution: overlapping tiles of PX pixels, auto "
                   "(the model's logit grid) or off (default: tiling.size of configs/v8.yaml)")
    p.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles "
                   "(default: tiling.overlap of configs/v8.yaml)")
    p.add_argument("--thresholds", type=_list(float, "--thresholds"), default=(0.5,),
                   help="probability thresholds of the model source, e.g. 0.3,0.5,0.7 (default 0.5)")
    p.add_argument("--perturbations", type=_list(str, "--perturbations"), default=DEFAULT_PERTURBATIONS,
                   help=f"perturb source kinds from {','.join(PERTURBATIONS)} (default {','.join(DEFAULT_PERTURBATIONS)})")
    p.add_argument("--perturb-variants", type=int, default=1,
                   help="variants per perturbation kind: strength 1..K for erode/dilate/drop_thin, K draws for break")
    p.add_argument("--max-samples", type=int, help="keep at most N pairs (a seeded choice)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--holdout", type=float, default=0.0, help="fraction of images held out of the pairs (0..1)")
    split.add_argument("--holdout-ids", help="file of held-out image ids (JSON list, holdout.json, or one a line)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, --max-samples and the break perturbation")
    p.add_argument("--dry-run", action="store_true", help="compute and print; write nothing")
    p.add_argument("--skip-bad", action="store_true", help="skip bad images (listed in the report) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {ANNOTATIONS} / earlier output")
    return p.parse_args(argv)


def _shown(path: Path) -> str:
    return os.path.relpath(path, REPO_ROOT)


def resolve_data(args: argparse.Namespace) -> Path:
    if args.data:
        return Path(args.data)
    cfg = load_config(DEFAULT_CONFIG)
    data = Path(cfg.data.root)
    if not data.is_dir():
        raise UserError(
            f"no data folder given and {cfg.data.root} (data.root of {_shown(DEFAULT_CONFIG)}) does not exist: "
            "pass --data DIR (a folder with images/ and masks/); "
            "`python -m sa2va.synth --out DIR --n 200` makes a synthetic one")
    print(f"no --data given: using data.root of {_shown(DEFAULT_CONFIG)}: {cfg.data.root}")
    return data


def resolve_sources(args: argparse.Namespace, data: Path) -> tuple[str, ...]:
    default_model = Path(load_config(DEFAULT_CONFIG).model.path)
    if args.model is None and not args.rejected and not (data / "rejected_masks").is_dir() and default_model.is_dir():
        # The mission's bare command: the default config's model makes the rejected masks.
        args.model = str(default_model)
        print(f"no --model given: using model.path of {_shown(DEFAULT_CONFIG)}: {default_model}")
    if args.rejected:
        sources = tuple(dict.fromkeys(args.rejected))
    else:
        sources = tuple(s for s, on in (("given", (data / "rejected_masks").is_dir()),
                                        ("model", args.model is not None)) if on)
        if not sources:
            suggestion = load_config(DEFAULT_CONFIG).model.path
            raise UserError(
                f"no rejected masks to pair with: {data / 'rejected_masks'} does not exist and no --model was "
                f"given; pass --model (e.g. {suggestion}, model.path of {_shown(DEFAULT_CONFIG)}) or "
                "--rejected perturb (perturbed ground truth)")
        print(f"rejected sources: {', '.join(sources)} (chosen from what {data} holds and the options)")
    if "model" in sources and args.model is None:
        suggestion = load_config(DEFAULT_CONFIG).model.path
        raise UserError(f"--rejected model needs --model PATH (e.g. {suggestion}, model.path of "
                        f"{_shown(DEFAULT_CONFIG)})")
    return sources


class LazyPredictor:
    """Loads the model on first use, so bad inputs are reported before a long model load."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = None
        cfg = load_config(DEFAULT_CONFIG)
        self.question, self.answer = cfg.model.question, cfg.model.answer
        size = parse_size(args.tile_size) if args.tile_size is not None else cfg.tiling.size
        overlap = args.tile_overlap if args.tile_overlap is not None else cfg.tiling.overlap
        check_tiling(size, overlap, "--tile-size", "--tile-overlap", prefix="")
        self.tile_size, self.tile_overlap = size, overlap
        # The config's yes covers the config's own model only, not any folder given as --model.
        same_model = Path(args.model).resolve() == Path(cfg.model.path).resolve()
        if args.trust_remote_code:
            self.trust, self.trust_from = True, "--trust-remote-code"
        elif same_model:
            self.trust = cfg.model.trust_remote_code
            self.trust_from = f"model.trust_remote_code of {_shown(DEFAULT_CONFIG)}"
        else:
            self.trust, self.trust_from = False, "no --trust-remote-code given"

    def __call__(self, images: list) -> list:
        from sa2va.model import load_sa2va
        from sa2va.tiling import predict_probabilities, resolve

        if self.model is None:
            print(f"loading {self.args.model} (trust_remote_code={self.trust}, from {self.trust_from})")
            try:
                self.model = load_sa2va(self.args.model, trust_remote_code=self.trust, device=self.args.device)
            except (UserError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as err:  # noqa: BLE001 - torn weights, broken remote code: one line, not a trace
                first = (str(err).strip().splitlines() or [""])[0]
                raise UserError(f"cannot load the model in {self.args.model}: {type(err).__name__}: {first}") from err
        tiles = resolve(self.tile_size, self.tile_overlap, self.model.low_res, "--tile-size", "--tile-overlap", "")
        return predict_probabilities(self.model, images, tiles, batch_size=self.args.batch_size,
                                     question=self.question, answer=self.answer)


def print_summary(result: Curation, report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from sa2va.console import print_whole

    console = Console(highlight=False, soft_wrap=True)
    table = Table(title=f"rejected masks (min-gap {result.options.min_gap:g})")
    widest = max((len(tag) for tag in report["per_source"]), default=8)
    for col in ("rejected", "cands", "kept", "<min", ">max", "dup", "=GT", "capped", "gap", "gap kept"):
        if col == "rejected":
            table.add_column(col, no_wrap=True, min_width=widest)
        else:
            table.add_column(col, justify="right")
    for tag, row in report["per_source"].items():
        table.add_row(tag, str(row["candidates"]), str(row["kept"]), str(row["gap_below_min"]),
                      str(row["gap_above_max"]), str(row["duplicate"]), str(row["identical_to_chosen"]),
                      str(row["max_samples"]), _fmt(row["mean_gap"]), _fmt(row["mean_gap_kept"]))
    print_whole(console, table)
    console.print("cands: candidates; <min / >max: dropped by the gap rule; dup: same mask as an earlier "
                  "rejected one; =GT: same as the chosen mask; capped: left out by --max-samples; "
                  "gap: mean gap of the distinct candidates, gap kept: of the kept pairs", markup=False)
    hist = report["gap_histogram"]
    console.print(text_histogram(hist["edges"], hist["counts"], hist["kept"], result.options.min_gap), markup=False)
    c = report["counts"]
    console.print(f"images: {c['images_found']} found, {c['images_skipped_bad']} skipped as bad, "
                  f"{c['images_held_out']} held out, {c['images_used']} used, {c['images_with_pairs']} with pairs",
                  markup=False)
    for s in result.skipped:
        console.print(f"  skipped {s.file}: {s.reason}", markup=False)
    console.print(f"pairs: {c['pairs']} kept of {c['candidates']} candidates", markup=False)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = resolve_data(args)
    check_data_folder(data)
    out = Path(args.out) if args.out else data
    sources = resolve_sources(args, data)
    holdout_ids = read_holdout_ids(args.holdout_ids) if args.holdout_ids else None
    opts = Options(min_gap=args.min_gap, max_gap=args.max_gap, sources=sources, thresholds=tuple(args.thresholds),
                   perturbations=tuple(args.perturbations), perturb_variants=args.perturb_variants,
                   max_samples=args.max_samples, holdout=args.holdout, holdout_ids=holdout_ids,
                   seed=args.seed, skip_bad=args.skip_bad)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    same = plan_output(data, out, args.overwrite)
    predictor = LazyPredictor(args) if "model" in sources else None
    progress = (lambda done, total: print(f"  model: {done}/{total} images", flush=True)) if predictor else None
    arguments = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    arguments["argv"] = sys.argv[1:] if argv is None else list(argv)

    stage = None if args.dry_run else make_stage(out, same)
    try:
        result = curate(data, opts, predictor=predictor, stage=stage, chunk=max(16, 4 * args.batch_size),
                        progress=progress)
        report = build_report(result, arguments, out)
        print_summary(result, report)
        if args.dry_run:
            print(f"dry run: nothing written (would write {out / ANNOTATIONS}, {out / REPORT}, {out / HOLDOUT})")
            return 0
        if not result.pairs:
            raise UserError(f"no pair passed the gap rule (min-gap {args.min_gap:g}); nothing written. "
                            "Lower --min-gap or add rejected sources (see the histogram above)")
        write_outputs(result, out, stage, report)
    finally:
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {len(result.pairs)} pairs to {out / ANNOTATIONS} (report {out / REPORT}, "
          f"{len(result.holdout)} held-out ids in {out / HOLDOUT})")
    return 0


if __name__ == "__main__":
    run_cli(main)
