"""Evaluation of a Sa2VA checkpoint on a vessel data set, and paired comparison of two runs.

    python evaluate.py --model DIR --data DIR [--out DIR] [--path forward|generate|both] ...
    python evaluate.py --compare A/results.json B/results.json [--json OUT.json] [--metrics dice,cldice]

Two ways to get a mask from the same weights:
  forward   the teacher-forced [SEG] forward that training uses (`predict_probabilities`,
            batched), thresholded at --threshold;
  generate  the model's own `predict_forward` (greedy generation; the mask of the first [SEG]
            it writes), one image at a time.
`both` runs the two and reports how far their masks agree: the training path and the
inference path must give the same mask, or what was trained is not what is measured.

Under torchrun, rank r takes images i % world == r; every rank predicts and scores its share,
rank 0 gathers the rows and writes everything. Nothing is written until every image has been
predicted, and results.json is written last, so a failed run never leaves a partial one.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .console import print_whole
from .data import ImageEntry, list_image_folder, load_image_entry, load_second_observer
from .errors import UserError
from .fileio import atomic_dir, check_writable_dir, write_json, write_mask, write_png, write_text
from .metrics import DISPLAY_NAMES, LOWER_IS_BETTER, METRICS, image_metrics, paired_compare, summarize
from .prediction import COLOUR_FN, COLOUR_FP, COLOUR_TP, overlay, prediction_record, probability_png  # noqa: F401

# What --compile compiles (sa2va.batching.compile_for_inference), as measured at the 26B shape
# (docs/performance.md runs 12-16, batch 8: 15.1 images/s eager, 20.0-21.2 with all three).
EVAL_COMPILED = ("llm", "vit", "sam")
COUNT_KEYS = ("tp", "fp", "fn", "tn", "skel_pred", "skel_pred_in_gt", "skel_gt", "skel_gt_in_pred",
              "components_pred", "components_gt")
HOLDOUT_FILE = "holdout.json"
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.json"


# --------------------------------------------------------------------------- options


@dataclass
class EvalOptions:
    model: Path
    data: Path
    out: Path
    paths: tuple[str, ...]  # ("forward",), ("generate",) or ("forward", "generate")
    mode: str  # forward | generate | both
    save_masks: bool = False
    overlays: int | None = 0  # None: every image (prediction without masks)
    batch_size: int = 4
    trust_remote_code: bool = False
    threshold: float = 0.5
    question: str = "Please segment the blood vessels."
    answer: str = "It is [SEG]."
    device: str = "auto"
    dtype: str = "auto"  # --dtype: float32 runs the whole forward in float32 (no bf16 autocast on CUDA)
    seed: int = 0
    n_boot: int = 2000
    all_images: bool = False
    predict: bool = False  # --predict: segment without scoring, even where masks exist
    save_probs: bool = False
    binarize: float | None = None
    tile_size: int | str | None = None  # None = untiled; pixels or "auto" (docs/resolution.md)
    tile_overlap: int = 32
    compile: bool = False  # --compile: torch.compile the forward path's blocks (CUDA; pays on large sets)

    @property
    def headline(self) -> str:
        return self.paths[0]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every entrypoint
        raise UserError(f"{message} (see python evaluate.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python evaluate.py",
                description="Evaluate a Sa2VA checkpoint on a vessel data set, or compare two result files.")
    p.add_argument("--model", help="HF Sa2VA folder (original or exported), a hub id such as ByteDance/Sa2VA-4B "
                                   "(through the Hugging Face cache), or a training checkpoint "
                                   "OUT/checkpoints/step_N (default: model.path of configs/v8.yaml)")
    p.add_argument("--data", help="data folder: images/, masks/, optional fov/ (and holdout.json), or images "
                                  "alone (predicted, not scored)")
    p.add_argument("--out", help="output folder (default eval/<model folder name>)")
    p.add_argument("--save-masks", action="store_true", help="write predicted masks as PNG under OUT/masks/")
    p.add_argument("--overlays", type=int, default=None, metavar="N",
                   help="write overlays of the first N images (default: none when scoring, all when predicting)")
    p.add_argument("--predict", action="store_true",
                   help="segment without scoring: masks (and overlays) only, even where masks exist; a folder "
                        "without masks is predicted anyway")
    p.add_argument("--save-probs", action="store_true",
                   help="also write the forward path's probability maps, 8-bit PNG = round(255 p), under OUT/probs/")
    p.add_argument("--binarize", type=float, metavar="T",
                   help="read grey-level or JPEG ground-truth masks as value > T (0-255 scale) instead of refusing")
    p.add_argument("--path", choices=("forward", "generate", "both"), default="forward",
                   help="forward = teacher-forced [SEG] forward (default); generate = predict_forward; both")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward batch (default 4)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow running the model folder's code")
    p.add_argument("--threshold", type=float, default=0.5, help="forward path: probability threshold (0.5)")
    p.add_argument("--question", help="the prompt (default: model.question of the config)")
    p.add_argument("--answer", help="forward path: the teacher-forced answer holding [SEG] "
                                    "(default: model.answer of the config)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights (auto: bfloat16 with bf16 autocast on CUDA, float32 on CPU; float32: no autocast)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward path's LLM, ViT and SAM2 encoder blocks (34-45 s at the 26B "
                        "shape, then 15.1 -> 20.0-21.2 images/s on an H200; worth it from about 2,500 images)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--n-boot", type=int, default=None,
                   help="bootstrap resamples (default 2000 for a summary, 5000 for --compare)")
    p.add_argument("--all-images", action="store_true", help="ignore DIR/holdout.json and score every image")
    p.add_argument("--tile-size", metavar="PX",
                   help="native resolution: cut images into overlapping tiles of PX pixels (or auto = the "
                        "model's logit grid; off = whole image); default: tiling.size of the model's config")
    p.add_argument("--tile-overlap", type=int, metavar="PX",
                   help="pixels shared by neighbouring tiles (default: tiling.overlap of the config, 32)")
    p.add_argument("--ceiling", action="store_true",
                   help="no model run: the resolution ceiling of --data (perfect-model Dice/clDice at the logit "
                        "resolution, untiled and with --tile-size); --model, if given, only sets the resolution")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results.json image by image")
    p.add_argument("--json", help="--compare: also write the comparison to this JSON file")
    p.add_argument("--metrics", help=f"--compare: comma-separated metrics (default all: {','.join(METRICS)})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        for flag in ("model", "data", "out"):
            if getattr(args, flag):
                raise UserError(f"--compare takes two results.json files; --{flag} does not apply")
        return run_compare(args)
    if args.ceiling:
        from .ceiling import run_ceiling

        return run_ceiling(args)
    if args.json or args.metrics:
        raise UserError("--json and --metrics belong to --compare")
    return run_evaluate(args)


# --------------------------------------------------------------------------- model and data


def _model_config(model: Path):
    """The run config that says how this model was prompted: a training checkpoint's own
    config.yaml, else the default config."""
    from .checkpoint import is_training_checkpoint
    from .config import DEFAULT_CONFIG, load_config

    if is_training_checkpoint(model):
        return load_config(model / "config.yaml")
    return load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)


def resolve_model(arg: str | None, say: Callable[[str], None]) -> tuple[Path, bool]:
    """(model folder, trust_remote_code from the config) for --model, or the default config's model."""
    if arg:
        from .hub import is_hub_id, resolve_model_path

        path = Path(arg)
        if not path.exists():
            if not is_hub_id(arg):
                raise UserError(f"model folder {path} does not exist")
            path = resolve_model_path(arg)  # owner/name: the snapshot in the Hugging Face cache
            say(f"model {arg}: {path}")
        return path, False
    from .config import DEFAULT_CONFIG, load_config

    cfg = load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    path = Path(cfg.model.path)
    if not path.exists():
        raise UserError(f"no --model given, and model.path of {DEFAULT_CONFIG.name} ({path}) does not exist: "
                        "pass --model DIR (a Sa2VA HF folder or OUT/checkpoints/step_N)")
    say(f"no --model given: using model.path of {DEFAULT_CONFIG.name}: {path}")
    return path, cfg.model.trust_remote_code


def default_out(model: Path) -> Path:
    """eval/<model folder name>; a training checkpoint or export is named after its run too."""
    resolved = Path(os.path.abspath(model))  # normalises "." and "..", keeps the user's link names
    name = resolved.name
    if resolved.parent.name == "checkpoints" and resolved.parent.parent.name:
        name = f"{resolved.parent.parent.name}_{name}"  # runs/v8/checkpoints/step_N -> v8_step_N
    elif resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        name = resolved.parent.parent.name.split("--")[-1]  # a hub id's cache snapshot -> the model's name
    elif name == "final" and resolved.parent.name:
        name = f"{resolved.parent.name}_final"  # train_dpo.py's export runs/v8/final -> v8_final
    return Path("eval") / name


def read_holdout(file: Path) -> list[str]:
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise UserError(f"cannot read {file}: {err}") from err
    ids = raw.get("ids") if isinstance(raw, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError(f"{file} must hold {{\"ids\": [image ids]}} (as curate_data.py writes it)")
    if not ids:
        raise UserError(f"{file} lists no held-out ids (pass --all-images to score every image)")
    return ids


def select_images(data: Path, all_images: bool, predict: bool = False,
                  binarize: float | None = None) -> tuple[list[ImageEntry], str, str, str | None]:
    """The images, where the list came from ("holdout.json" or "all"), a sentence, and why no
    metrics will be computed (None when the images are scored).

    Scored when every selected image has a mask; predicted when --predict is given, or when
    the folder has no masks at all (no masks/ folder, or images with no masks/ beside them).
    Some images with masks and some without is refused: scoring only part would mislead.
    """
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist")
    holdout = data / HOLDOUT_FILE
    ids = read_holdout(holdout) if holdout.is_file() and not all_images else None
    entries = list_image_folder(data, need_masks=False, ids=ids, binarize=binarize, flat_ok=True)
    where = data / "images" if (data / "images").is_dir() else data
    selection = HOLDOUT_FILE if ids is not None else "all"
    sentence = (f"{holdout} found: {len(entries)} held-out images (--all-images takes every image)"
                if ids is not None else f"all {len(entries)} images of {where}")
    without = [e for e in entries if e.mask is None]
    reason = None
    if predict:
        reason = "--predict was given"
    elif len(without) == len(entries):
        reason = (f"{data} has no masks/ folder" if not (data / "masks").is_dir()
                  else f"no image of {where} has a mask in {data / 'masks'}")
    elif without:
        first = without[0]
        raise UserError(f"image {first.image} has no mask in {data / 'masks'} ({len(without)} of {len(entries)} "
                        "images have none); pass --predict to segment without scoring")
    verb = "predicting" if reason else "evaluating"
    return entries, selection, f"{verb} {sentence}", reason


def shard(entries: list[ImageEntry], rank: int, world: int) -> list[ImageEntry]:
    return [e for i, e in enumerate(entries) if i % world == rank]


def check_entries(entries: list[ImageEntry]) -> str | None:
    """Read every image and mask once before any model is loaded; the first problem, or None."""
    for entry in entries:
        try:
            load_image_entry(entry)
        except UserError as err:
            return str(err)
    return None


def _model_code_folder(model: Path) -> Path:
    from .checkpoint import is_training_checkpoint

    if is_training_checkpoint(model):
        return Path(_model_config(model).model.path)
    return model


def predict_forward_needs_cuda(model: Path) -> bool:
    """True when the model's remote code calls `.cuda()` anywhere (the real release does, in
    predict_forward), read from the source without importing it; strings and comments that
    mention it do not count."""
    folder = _model_code_folder(model)
    try:
        config = json.loads((folder / "config.json").read_text())
        module = config["auto_map"]["AutoModel"].split("--")[-1].rsplit(".", 1)[0]
        tree = ast.parse((folder / f"{module}.py").read_text())
    except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError, SyntaxError):
        return False  # loading will name the problem
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda"
               for node in ast.walk(tree))


def load_model(model: Path, trust_remote_code: bool, device: str, dtype: str = "auto"):
    from .checkpoint import load_for_inference

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        return load_for_inference(model, trust_remote_code, device=device, dtype=dtype)
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - torn weights, bad shapes, library errors: one line, not a trace
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        raise UserError(f"cannot load the model in {model}: {type(err).__name__}: {first}") from err


# --------------------------------------------------------------------------- prediction


def generate_mask(sa2va: Any, image: np.ndarray, question: str) -> tuple[np.ndarray, str, int]:
    """The model's own inference: (mask of the first [SEG], generated text, number of [SEG])."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        out = sa2va.model.predict_forward(image=Image.fromarray(image), text=f"<image>\n{question}",
                                          **sa2va.family.generate_kwargs(sa2va))
    text = str(out.get("prediction", ""))
    masks = out.get("prediction_masks") or []
    height, width = image.shape[:2]
    if masks:
        mask = np.asarray(masks[0])
        if mask.ndim == 3:
            mask = mask[0]
        if mask.shape != (height, width):
            raise RuntimeError(f"predict_forward returned a {mask.shape} mask for a {height}x{width} image")
        mask = mask.astype(bool)
    else:
        mask = np.zeros((height, width), bool)  # no [SEG] generated: the model segmented nothing
    return mask, text, text.count("[SEG]")


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks over the whole image; two empty masks agree perfectly (1.0)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _pack(mask: np.ndarray) -> tuple[tuple[int, int], bytes]:
    return (int(mask.shape[0]), int(mask.shape[1])), np.packbits(mask, axis=None).tobytes()


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _unpack(packed: tuple[tuple[int, int], bytes]) -> np.ndarray:
    shape, data = packed
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=shape[0] * shape[1])
    return bits.reshape(shape).astype(bool)


@dataclass
class ShardResult:
    """What one rank sends to rank 0 (plain types, so all_gather_object can pickle it)."""

    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # name -> path -> metrics
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> has_seg, n_seg, text, agreement
    masks: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> name -> packed mask
    seconds: dict[str, float] = field(default_factory=dict)  # path -> model time
    probs: dict[str, bytes] = field(default_factory=dict)  # name -> 8-bit PNG of the forward probabilities
    error: str | None = None


def predict_shard(sa2va: Any, entries: list[ImageEntry], opts: EvalOptions, keep_masks: set[str],
                  advance: Callable[[int], None]) -> ShardResult:
    """Predict and score this rank's images; masks of the names in keep_masks are kept (packed)."""
    from . import tiling

    tiles = tiling.resolve(opts.tile_size, opts.tile_overlap, sa2va.low_res, "--tile-size", "--tile-overlap", "")
    result = ShardResult(seconds={p: 0.0 for p in opts.paths}, masks={p: {} for p in opts.paths})
    for start in range(0, len(entries), opts.batch_size):
        chunk = entries[start:start + opts.batch_size]
        loaded = [load_image_entry(e) for e in chunk]
        images = [image for image, _, _ in loaded]
        preds: dict[str, list[np.ndarray]] = {}
        if "forward" in opts.paths:
            t0 = time.perf_counter()
            probs = tiling.predict_probabilities(sa2va, images, tiles, batch_size=opts.batch_size,
                                                 question=opts.question, answer=opts.answer)
            result.seconds["forward"] += time.perf_counter() - t0
            preds["forward"] = [p > opts.threshold for p in probs]
            if opts.save_probs:
                for entry, prob in zip(chunk, probs):
                    result.probs[entry.name] = _png_bytes(probability_png(prob))
        if "generate" in opts.paths:
            preds["generate"] = []
            for entry, image in zip(chunk, images):
                t0 = time.perf_counter()
                mask, text, n_seg = tiling.generate_tiled(lambda im: generate_mask(sa2va, im, opts.question),
                                                          image, tiles)
                result.seconds["generate"] += time.perf_counter() - t0
                preds["generate"].append(mask)
                result.generation[entry.name] = {"has_seg": n_seg > 0, "n_seg": n_seg, "text": text}
        for i, (entry, (_, gt, fov)) in enumerate(zip(chunk, loaded)):
            scored = gt is not None and not opts.predict
            result.rows[entry.name] = {p: image_metrics(preds[p][i], gt, fov) for p in opts.paths} if scored else {}
            if len(opts.paths) == 2:
                a, b = preds["forward"][i], preds["generate"][i]
                result.generation[entry.name]["agreement_dice"] = mask_dice(a, b)
                result.generation[entry.name]["differing_pixels"] = int(np.count_nonzero(a != b))
            if entry.name in keep_masks:
                for p in opts.paths:
                    result.masks[p][entry.name] = _pack(preds[p][i])
        advance(len(chunk))
    return result


# --------------------------------------------------------------------------- outputs


def _folder(kind: str, path: str, headline: str) -> str:
    """masks / overlays for the headline path; masks_generate / overlays_generate for the other."""
    return kind if path == headline else f"{kind}_{path}"


def per_image_table(names: list[str], rows: dict[str, dict[str, dict[str, float]]],
                    generation: dict[str, dict[str, Any]], opts: EvalOptions) -> tuple[list[str], list[list[Any]]]:
    """CSV columns and rows: the headline path's columns unprefixed, the other path's prefixed."""
    header = ["name"]
    for p in opts.paths:
        prefix = "" if p == opts.headline else f"{p}_"
        header += [prefix + k for k in METRICS + COUNT_KEYS]
    extra: list[str] = []
    if len(opts.paths) == 2:
        extra += ["agreement_dice", "differing_pixels"]
    if "generate" in opts.paths:
        extra += ["has_seg", "n_seg", "text"]
    header += extra
    table = []
    for name in names:
        line: list[Any] = [name]
        for p in opts.paths:
            line += [_csv_value(rows[name][p][k]) for k in METRICS + COUNT_KEYS]
        line += [_csv_value(generation[name][k]) for k in extra]
        table.append(line)
    return header, table


def _csv_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return repr(v)  # full precision: a re-read gives the same float
    return v


def _write_masks(opts: EvalOptions, names: list[str], masks: dict) -> list[Path]:
    """masks/ (or masks_<path>/): every image's predicted mask at its own size, 0/255 PNG."""
    written = []
    for p in opts.paths:
        target = opts.out / _folder("masks", p, opts.headline)
        with atomic_dir(target, overwrite=True) as tmp:
            for name in names:
                write_mask(tmp / f"{name}.png", _unpack(masks[p][name]))
        written.append(target)
    return written


def _write_probs(opts: EvalOptions, names: list[str], probs: dict[str, bytes]) -> list[Path]:
    if not opts.save_probs:
        return []
    target = opts.out / "probs"
    with atomic_dir(target, overwrite=True) as tmp:
        for name in names:
            (tmp / f"{name}.png").write_bytes(probs[name])
    return [target]


def write_predictions(opts: EvalOptions, entries: list[ImageEntry], masks: dict, probs: dict[str, bytes],
                      reason: str, seconds: dict[str, float], world: int, device: str, dtype: str) -> list[Path]:
    """Prediction without scoring: masks/ (every image, its own size, 0/255), probs/, overlays
    (prediction colour + legend), and predictions.json last; no results.json."""
    names = [e.name for e in entries]
    written: list[Path] = []
    written += _write_masks(opts, names, masks)
    written += _write_probs(opts, names, probs)
    if opts.overlays:
        for p in opts.paths:
            target = opts.out / _folder("overlays", p, opts.headline)
            with atomic_dir(target, overwrite=True) as tmp:
                for entry in entries[: opts.overlays]:
                    image, _, fov = load_image_entry(ImageEntry(entry.name, entry.image, None, entry.fov))
                    write_png(tmp / f"{entry.name}.png", overlay(image, _unpack(masks[p][entry.name]), None, fov))
            written.append(target)
    head = {n: _unpack(masks[opts.headline][n]) for n in names}
    write_json(opts.out / PREDICTIONS_FILE, prediction_record(opts, names, head, reason, seconds, world, device,
                                                              dtype))
    written.append(opts.out / PREDICTIONS_FILE)
    return written


def second_observer(entries: list[ImageEntry], opts: EvalOptions) -> dict[str, Any] | None:
    """The second observer scored against the first (masks_2nd/ vs masks/), on the scored images
    that have one: the agreement a model can hope to reach."""
    rows, names = [], []
    for entry in entries:
        if entry.second is None or entry.mask is None:
            continue
        image, gt, fov = load_image_entry(entry)
        second = load_second_observer(entry, image.shape[:2])
        rows.append(image_metrics(second, gt, fov))
        names.append(entry.name)
    if not rows:
        return None
    return {"n": len(rows), "metrics": summarize(rows, METRICS, n_boot=opts.n_boot, seed=opts.seed),
            "per_image": {n: {m: r[m] for m in METRICS} for n, r in zip(names, rows)}}


def write_outputs(opts: EvalOptions, entries: list[ImageEntry], rows: dict, generation: dict, masks: dict,
                  results: dict[str, Any], probs: dict[str, bytes] | None = None) -> list[Path]:
    """Masks and overlays (each folder replaced whole, only once complete), per_image.csv, and
    results.json last."""
    names = [e.name for e in entries]
    written: list[Path] = []
    written += _write_probs(opts, names, probs or {})
    if opts.save_masks:
        written += _write_masks(opts, names, masks)
    if opts.overlays > 0:
        for p in opts.paths:
            target = opts.out / _folder("overlays", p, opts.headline)
            with atomic_dir(target, overwrite=True) as tmp:
                for entry in entries[: opts.overlays]:
                    image, gt, fov = load_image_entry(entry)
                    write_png(tmp / f"{entry.name}.png", overlay(image, _unpack(masks[p][entry.name]), gt, fov))
            written.append(target)
    header, table = per_image_table(names, rows, generation, opts)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(table)
    write_text(opts.out / "per_image.csv", buf.getvalue())
    written.append(opts.out / "per_image.csv")
    write_json(opts.out / RESULTS_FILE, results)
    written.append(opts.out / RESULTS_FILE)
    return written


def build_results(opts: EvalOptions, names: list[str], selection: str, rows: dict, generation: dict,
                  seconds: dict[str, float], world: int, device: str, dtype: str) -> dict[str, Any]:
    """The results.json document (see docs/evaluation.md for every key)."""
    paths_block: dict[str, Any] = {}
    speed: dict[str, float | None] = {}
    for p in opts.paths:
        per = [rows[n][p] for n in names]
        summary = summarize(per, METRICS, n_boot=opts.n_boot, seed=opts.seed)
        secs = seconds.get(p, 0.0)
        speed[p] = len(names) / secs if secs > 0 else None
        paths_block[p] = {
            "metrics": summary,
            "per_image": {n: {m: rows[n][p][m] for m in METRICS} for n in names},
            "seconds": secs,
            "images_per_s": speed[p],
        }
    head = paths_block[opts.headline]
    results: dict[str, Any] = {
        "model": str(opts.model.resolve()),
        "data": str(opts.data.resolve()),
        "selection": selection,
        "path": opts.mode,
        "headline": opts.headline,
        "n": len(names),
        "threshold": opts.threshold,
        "question": opts.question,
        "answer": opts.answer,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
        "n_boot": opts.n_boot,
        "world_size": world,
        "device": device,
        "dtype": dtype,
        "tiling": None if opts.tile_size is None else {"size": opts.tile_size, "overlap": opts.tile_overlap},
        "metrics": head["metrics"],
        "per_image": head["per_image"],
        "speed": speed,
        "paths": paths_block,
    }
    if "generate" in opts.paths:
        with_seg = sum(1 for n in names if generation[n]["has_seg"])
        results["generation"] = {
            "fraction_with_seg": with_seg / len(names),
            "per_image": {n: {k: generation[n][k] for k in ("has_seg", "n_seg", "text")} for n in names},
        }
    if len(opts.paths) == 2:
        dice = np.array([generation[n]["agreement_dice"] for n in names])
        results["agreement"] = {
            "mean_dice": float(dice.mean()),
            "median_dice": float(np.median(dice)),
            "min_dice": float(dice.min()),
            "min_dice_image": names[int(dice.argmin())],
            "identical_images": int(sum(1 for n in names if generation[n]["differing_pixels"] == 0)),
            "fraction_with_seg": results["generation"]["fraction_with_seg"],
            "images_per_s": speed,
            "per_image": {n: {"dice": generation[n]["agreement_dice"],
                              "differing_pixels": generation[n]["differing_pixels"],
                              "has_seg": generation[n]["has_seg"], "text": generation[n]["text"]}
                          for n in names},
        }
    return results


# --------------------------------------------------------------------------- terminal


def _console():
    from .console import make_console

    return make_console()


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def summary_table(title: str, summary: dict[str, dict[str, Any]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption="components error: lower is better",
                  caption_justify="left")
    for col in ("metric", "mean", "95% CI", "median", "std", "pooled"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for m in METRICS:
        s = summary[m]
        d = 2 if m in LOWER_IS_BETTER else 4  # a count error needs no four decimals
        table.add_row(DISPLAY_NAMES.get(m, m), _fmt(s["mean"], d), f"{_fmt(s['ci_low'], d)} to {_fmt(s['ci_high'], d)}",
                      _fmt(s["median"], d), _fmt(s["std"], d), _fmt(s["pooled"], d))
    return table


def print_results(console: Any, results: dict[str, Any], opts: EvalOptions, written: list[Path]) -> None:
    n = results["n"]
    for p in opts.paths:
        tag = " (headline)" if len(opts.paths) == 2 and p == opts.headline else ""
        print_whole(console, summary_table(f"{p} path{tag}: {n} images, {opts.model}", results["paths"][p]["metrics"]))
    if "second_observer" in results:
        so = results["second_observer"]
        print_whole(console, summary_table(f"second observer against the first (masks_2nd/, {so['n']} images): "
                                           "the agreement between two people", so["metrics"]))
    if "agreement" in results:
        a = results["agreement"]
        differing = sum(v["differing_pixels"] for v in a["per_image"].values())
        console.print(f"path agreement (forward vs generate masks): mean Dice {a['mean_dice']:.6f}, min "
                      f"{a['min_dice']:.6f} ({a['min_dice_image']}); identical masks on {a['identical_images']}/{n} "
                      f"images, {differing} differing pixels in all")
    if "generation" in results:
        g = results["generation"]
        console.print(f"[SEG] generated on {round(g['fraction_with_seg'] * n)}/{n} images")
    for p, speed in results["speed"].items():
        extra = f", batch {opts.batch_size}" if p == "forward" else ", one image at a time"
        console.print(f"speed {p}: {_fmt(speed, 2)} images/s ({results['device']}{extra})")
    for path in written:
        console.print(f"wrote {path}")


# --------------------------------------------------------------------------- evaluate


def _options(args: argparse.Namespace, model: Path, trust_cfg: bool) -> EvalOptions:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.overlays is not None and args.overlays < 0:
        raise UserError(f"--overlays must be >= 0, got {args.overlays}")
    if args.save_probs and args.path == "generate":
        raise UserError("--save-probs needs the forward path (predict_forward gives no probabilities): "
                        "use --path forward or both")
    if args.binarize is not None and not 0 <= args.binarize < 255:
        raise UserError(f"--binarize must lie in [0, 255), got {args.binarize}")
    if not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    n_boot = 2000 if args.n_boot is None else args.n_boot
    if n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, got {n_boot}")
    if not args.data:
        raise UserError("--data DIR is required (a folder with images/ and masks/)")
    cfg = _model_config(model)
    question = args.question if args.question is not None else cfg.model.question
    answer = args.answer if args.answer is not None else cfg.model.answer
    if "[SEG]" not in answer:
        raise UserError(f"--answer must contain [SEG], got {answer!r}")
    paths = {"forward": ("forward",), "generate": ("generate",), "both": ("forward", "generate")}[args.path]
    tile_size, tile_overlap = tile_options(args, cfg.tiling)
    return EvalOptions(
        model=model, data=Path(args.data), out=Path(args.out) if args.out else default_out(model),
        paths=paths, mode=args.path, save_masks=args.save_masks, overlays=args.overlays,
        batch_size=args.batch_size, trust_remote_code=args.trust_remote_code or trust_cfg,
        threshold=args.threshold, question=question, answer=answer, device=args.device, seed=args.seed,
        n_boot=n_boot, all_images=args.all_images, predict=args.predict, save_probs=args.save_probs,
        binarize=args.binarize, tile_size=tile_size, tile_overlap=tile_overlap, compile=getattr(args, "compile", False),
        dtype=getattr(args, "dtype", "auto"),
    )


def tile_options(args: argparse.Namespace, tiling_cfg: Any) -> tuple[int | str | None, int]:
    """--tile-size / --tile-overlap, else the config's tiling; refused by flag name."""
    from .tiling import check_tiling, parse_size

    size = parse_size(args.tile_size) if args.tile_size is not None else tiling_cfg.size
    overlap = args.tile_overlap if args.tile_overlap is not None else tiling_cfg.overlap
    check_tiling(size, overlap, "--tile-size", "--tile-overlap", prefix="")
    return size, overlap


def _gather_error(error: str | None) -> str | None:
    """The first error of any rank (every rank gets the same answer)."""
    from .distributed import all_gather_objects

    errors = [e for e in all_gather_objects(error) if e]
    return errors[0] if errors else None


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .distributed import barrier, init_distributed, shutdown

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no GPU")
    info = init_distributed(device=args.device)
    console = _console()
    say = console.print if info.is_main else (lambda *_a, **_k: None)
    try:
        code = _evaluate(args, info, say, console)
        # Rank 0 writes the outputs while the others wait: a rank that tears its process group
        # down while another still uses it can abort gloo ("terminate called ...").
        barrier()
        return code
    except UserError:
        if not info.is_main:
            raise SystemExit(2)  # rank 0 prints the one line
        raise
    finally:
        shutdown()


def _evaluate(args: argparse.Namespace, info: Any, say: Callable[..., None], console: Any) -> int:
    from .model import check_model_folder

    # Everything that can be refused is refused before the model is loaded.
    error, created = None, False
    try:
        model, trust_cfg = resolve_model(args.model, say)
        opts = _options(args, model, trust_cfg)
        check_model_folder(_model_code_folder(model))
        entries, selection, sentence, reason = select_images(opts.data, opts.all_images, opts.predict,
                                                             opts.binarize)
        if reason:
            opts.predict = True
            opts.overlays = len(entries) if opts.overlays is None else opts.overlays
        opts.overlays = opts.overlays or 0
        if "generate" in opts.paths and info.device.type == "cpu" and predict_forward_needs_cuda(model):
            raise UserError(f"--path {opts.mode}: this model's remote code hard-codes CUDA (.cuda()), so its "
                            "predict_forward cannot run on CPU; use --path forward on CPU, or run on a GPU")
        if info.is_main:
            created = not opts.out.exists()
            check_writable_dir(opts.out)
    except UserError as err:
        error = str(err)
    try:
        error = _gather_error(error)
        if error:
            raise UserError(error)
        say(sentence)
        return _run(opts, entries, selection, info, say, console, reason)
    except BaseException:
        if created and opts.out.is_dir() and not any(opts.out.iterdir()):
            opts.out.rmdir()  # a failed run leaves no empty output folder behind
        raise


def _run(opts: EvalOptions, entries: list[ImageEntry], selection: str, info: Any, say: Callable[..., None],
         console: Any, reason: str | None = None) -> int:
    import torch

    from .distributed import all_gather_objects

    mine = shard(entries, info.rank, info.world_size)
    if info.world_size > 1:
        say(f"{info.world_size} processes: rank r scores images i % {info.world_size} == r "
            f"({len(mine)} on rank 0)")
    error = _gather_error(check_entries(mine))
    if error:
        raise UserError(error)

    torch.manual_seed(opts.seed)
    say(f"loading {opts.model} ...")
    t0 = time.perf_counter()
    error, sa2va = None, None
    try:
        sa2va = load_model(opts.model, opts.trust_remote_code, str(info.device), opts.dtype)
    except UserError as err:
        error = str(err)
    error = _gather_error(error)
    if error:
        raise UserError(error)
    say(f"loaded in {time.perf_counter() - t0:.1f} s ({sa2va.device}, {str(sa2va.dtype).replace('torch.', '')})")
    if opts.compile and "generate" in opts.paths:
        say("--compile: skipped with the generate path (decoding would recompile the LLM at every length)")
    elif opts.compile:
        from .batching import compile_for_inference

        say(f"compiling {len(compile_for_inference(sa2va, EVAL_COMPILED))} LLM, ViT and SAM2 blocks "
            "(the first batch is slower)")
    if opts.tile_size is not None:
        if opts.tile_size == "auto":
            opts.tile_size = sa2va.low_res  # the model's logit-grid side: one logit per pixel
        say(f"tiles of {opts.tile_size} px, overlap {opts.tile_overlap} px (logit grid {sa2va.low_res}x{sa2va.low_res})")

    names_all = [e.name for e in entries]
    keep = set(names_all) if opts.save_masks or opts.predict else set(names_all[: opts.overlays])
    result = _predict_with_progress(sa2va, mine, opts, keep, info)
    gathered: list[ShardResult] = all_gather_objects(result)
    errors = [r.error for r in gathered if r.error]
    if errors:
        raise UserError(errors[0])
    if not info.is_main:
        return 0

    rows, generation, masks, probs = {}, {}, {p: {} for p in opts.paths}, {}
    seconds = {p: 0.0 for p in opts.paths}
    for r in gathered:
        rows.update(r.rows)
        generation.update(r.generation)
        probs.update(r.probs)
        for p in opts.paths:
            masks[p].update(r.masks[p])
            seconds[p] = max(seconds[p], r.seconds[p])  # ranks run side by side: the slowest sets the pace
    missing = [n for n in names_all if n not in rows]
    if missing:
        raise UserError(f"no prediction came back for {', '.join(missing[:5])}")
    device, dtype = str(sa2va.device), str(sa2va.dtype).replace("torch.", "")
    if opts.predict:
        written = write_predictions(opts, entries, masks, probs, reason or "--predict was given", seconds,
                                    info.world_size, device, dtype)
        for path in written:
            console.print(f"wrote {path}")
        console.print(f"no metrics computed: {reason or '--predict was given'}; {len(names_all)} images segmented "
                      f"(masks at each image's own size in {opts.out / 'masks'})")
        return 0
    results = build_results(opts, names_all, selection, rows, generation, seconds, info.world_size, device, dtype)
    observer = second_observer(entries, opts)
    if observer:
        results["second_observer"] = observer
    if opts.save_probs:
        results["probs"] = str(opts.out / "probs")
    written = write_outputs(opts, entries, rows, generation, masks, results, probs)
    print_results(console, results, opts, written)
    return 0


def _predict_with_progress(sa2va: Any, mine: list[ImageEntry], opts: EvalOptions, keep: set[str],
                           info: Any) -> ShardResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    label = "+".join(opts.paths) + (f" (rank 0 of {info.world_size})" if info.world_size > 1 else "")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not info.is_main)
    with progress:
        task = progress.add_task(label, total=len(mine))
        try:
            return predict_shard(sa2va, mine, opts, keep, lambda k: progress.advance(task, k))
        except UserError as err:
            return ShardResult(error=str(err))


# --------------------------------------------------------------------------- compare


def load_results(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if file.is_dir():
        file = file / RESULTS_FILE
    if not file.is_file():
        raise UserError(f"result file {file} not found")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise UserError(f"{file} is not a readable results.json: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("per_image"), dict) or not data["per_image"]:
        raise UserError(f"{file} has no per_image block: not a results.json written by evaluate.py")
    data["_file"] = str(file)
    return data


def _label(result: dict[str, Any]) -> str:
    return Path(result["_file"]).resolve().parent.name or Path(result["_file"]).stem


def run_compare(args: argparse.Namespace) -> int:
    a, b = (load_results(p) for p in args.compare)
    name_a, name_b = _label(a), _label(b)
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    metrics = list(METRICS)
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise UserError(f"--metrics: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(METRICS)}")
    n_boot = 5000 if args.n_boot is None else args.n_boot
    if n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, got {n_boot}")

    def column(result: dict[str, Any], metric: str) -> dict[str, float]:
        out = {}
        for name, row in result["per_image"].items():
            if not isinstance(row, dict) or metric not in row:
                raise UserError(f"{result['_file']}: image {name} has no {metric!r} value")
            out[name] = float(row[metric])
        return out

    comparisons = {m: paired_compare(column(a, m), column(b, m), metric=m, n_boot=n_boot, seed=args.seed,
                                     name_a=name_a, name_b=name_b) for m in metrics}
    console = _console()
    notes = [f"{key} differs: {a.get(key)!r} vs {b.get(key)!r}" for key in ("data", "headline", "threshold", "question")
             if a.get(key) != b.get(key)]
    print_whole(console, compare_table(comparisons, name_a, name_b, a["_file"], b["_file"]))
    for m in metrics:
        console.print(comparisons[m]["sentence"])
    for note in notes:
        console.print(f"note: {note}")
    if args.json:
        doc = {"a": a["_file"], "b": b["_file"], "name_a": name_a, "name_b": name_b,
               "n": next(iter(comparisons.values()))["n"], "n_boot": n_boot, "seed": args.seed,
               "notes": notes, "metrics": comparisons}
        write_json(args.json, doc)
        console.print(f"wrote {args.json}")
    return 0


def compare_table(comparisons: dict[str, dict[str, Any]], name_a: str, name_b: str, file_a: str, file_b: str):
    from rich import box
    from rich.table import Table

    n = next(iter(comparisons.values()))["n"]
    table = Table(title=f"paired comparison on {n} images\nA = {name_a} ({file_a})\nB = {name_b} ({file_b})",
                  title_justify="left", box=box.SIMPLE_HEAD, caption="p: two-sided Wilcoxon signed-rank; CI: paired "
                  "bootstrap of the mean difference; *: significant (p < 0.05 and the CI excludes 0)", caption_justify="left")
    for col in ("metric", "mean A", "mean B", "B - A", "95% CI", "p", ""):
        table.add_column(col, justify="left" if col in ("metric", "") else "right", no_wrap=True)
    for m, c in comparisons.items():
        mark = "*" if c["significant"] else ""
        table.add_row(DISPLAY_NAMES.get(m, m), _fmt(c["mean_a"]), _fmt(c["mean_b"]), f"{c['mean_diff']:+.4f}",
                      f"{c['ci_low']:+.4f} to {c['ci_high']:+.4f}", f"{c['p']:.2g}", mark)
    return table
