"""DPO preference pairs from a vessel data set: chosen = ground truth, rejected = a worse mask.

A pair is kept only when the rejected mask is measurably worse than the chosen one:
gap = 1 - Dice(rejected, chosen) >= min_gap. Rejected masks come from three sources:
`given` (DIR/rejected_masks/NAME.png), `model` (the model's own prediction, thresholded at one
or more levels) and `perturb` (the ground truth eroded, dilated, broken into pieces, or with
its thin vessels dropped). Several rejected masks per image are allowed, each under the gap
rule; identical ones are kept once.

The pieces here are plain functions (gap, perturbations, split, selection, histogram, report)
plus `discover` (which reads and checks the inputs) and `curate` (which runs the whole
computation and, when given a staging folder, writes the new rejected masks there). Writing
the result into place is `write_outputs`; the entrypoint `curate_data.py` only parses options.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import UserError
from .fileio import check_writable_dir, read_mask, read_rgb, safe_join, write_json, write_mask
from .imageio import IMAGE_SUFFIXES, find_named

SOURCES = ("given", "model", "perturb")
PERTURBATIONS = ("erode", "dilate", "break", "drop_thin")
DEFAULT_PERTURBATIONS = ("erode", "dilate", "break")
ANNOTATIONS = "dpo_annotations.json"
REPORT = "curation_report.json"
HOLDOUT = "holdout.json"
CURATED_DIR = "curated_rejected"
INPUT_DIRS = ("images", "masks", "rejected_masks", "fov")
HIST_BINS = 10

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connected 3x3 cross

Predictor = Callable[[list[np.ndarray]], list[np.ndarray]]


# ----------------------------------------------------------------------------- pure pieces


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; both empty = 1.0 (the metrics convention)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def gap(rejected: np.ndarray, chosen: np.ndarray) -> float:
    """1 - Dice(rejected, chosen), computed as |rejected XOR chosen| / (|rejected| + |chosen|).

    The single division makes a gap that equals a decimal such as 0.15 exactly the same float
    as `0.15`, so the boundary of the gap rule (gap >= min_gap keeps) is exact.
    """
    total = int(np.count_nonzero(rejected)) + int(np.count_nonzero(chosen))
    if total == 0:
        return 0.0
    return int(np.count_nonzero(rejected ^ chosen)) / total


def stable_int(*parts: Any) -> int:
    """A 64-bit integer from the parts, the same on every machine and Python run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def rng_for(seed: int, image_id: str, tag: str) -> np.random.Generator:
    """A generator that depends only on (seed, image, what it is for), not on processing order."""
    return np.random.default_rng(stable_int("rng", seed, image_id, tag))


def erode(mask: np.ndarray, strength: int = 1) -> np.ndarray:
    """Binary erosion by a 3x3 cross, `strength` times: every vessel up to 2*strength px wide
    vanishes (1-px capillaries always), thicker ones get thinner."""
    return ndimage.binary_erosion(mask, structure=_CROSS, iterations=strength, border_value=1)


def dilate(mask: np.ndarray, strength: int = 1) -> np.ndarray:
    """Binary dilation by a 3x3 cross, `strength` times: every vessel gets fatter."""
    return ndimage.binary_dilation(mask, structure=_CROSS, iterations=strength)


def drop_thin(mask: np.ndarray, strength: int = 1) -> np.ndarray:
    """Remove thin vessels, keep thick ones at their true width (a model that misses capillaries).

    Opening (erode then dilate) removes structures narrower than the element; intersecting a
    one-step dilation of it with the mask restores the thick vessels' exact outline.
    """
    opened = ndimage.binary_opening(mask, structure=_CROSS, iterations=strength, border_value=1)
    return mask & ndimage.binary_dilation(opened, structure=_CROSS, iterations=1)


def break_vessels(mask: np.ndarray, rng: np.random.Generator, every: int = 25,
                  extra: tuple[float, float] = (1.5, 3.5)) -> np.ndarray:
    """Cut vessels at random points of their centre line (one cut per `every` skeleton pixels,
    at least 3; on the synthetic vessels that removes about 17% of the mask). Each cut is a disc whose radius is the vessel's local half-width plus a random
    1.5-3.5 px, so it always severs the vessel across its whole width."""
    from skimage.morphology import skeletonize

    if not mask.any():
        return mask.copy()
    skeleton = skeletonize(mask)
    points = np.flatnonzero(skeleton)
    if points.size == 0:
        return mask.copy()
    count = min(points.size, max(3, points.size // every))
    centres = rng.choice(points, size=count, replace=False)
    half_width = ndimage.distance_transform_edt(mask).ravel()[centres]
    radius = half_width + rng.uniform(extra[0], extra[1], size=count)
    seeds = np.zeros(mask.shape, bool)
    seeds.ravel()[centres] = True
    # distance from every pixel to its nearest cut centre, and which centre that is
    dist, nearest = ndimage.distance_transform_edt(~seeds, return_indices=True)
    nearest_flat = np.ravel_multi_index(tuple(nearest), mask.shape)
    radius_map = np.zeros(mask.size)
    radius_map[centres] = radius
    cut = dist <= radius_map[nearest_flat].reshape(mask.shape)
    return mask & ~cut


def perturb(mask: np.ndarray, kind: str, variant: int, seed: int, image_id: str) -> np.ndarray:
    """One perturbed copy of the ground truth. variant 1, 2, ... is the strength for erode,
    dilate and drop_thin (deterministic morphology) and a fresh random draw for break."""
    if kind == "erode":
        return erode(mask, variant)
    if kind == "dilate":
        return dilate(mask, variant)
    if kind == "drop_thin":
        return drop_thin(mask, variant)
    if kind == "break":
        return break_vessels(mask, rng_for(seed, image_id, f"break{variant}"))
    raise UserError(f"unknown perturbation {kind!r} (known: {', '.join(PERTURBATIONS)})")


def perturb_tag(kind: str, variant: int) -> str:
    return kind if variant == 1 else f"{kind}{variant}"


def model_tag(threshold: float) -> str:
    return f"model_t{threshold:.2f}"


def split_holdout(ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """round(fraction * n) ids, chosen by a seeded hash of each id (sorted).

    An id's rank does not depend on the other ids, so adding images to a data set moves few
    images between the splits; the same seed and ids always give the same split.
    """
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"--holdout must be a fraction in [0, 1], got {fraction}")
    count = int(round(fraction * len(ids)))
    ranked = sorted(ids, key=lambda i: (stable_int("holdout", seed, i), i))
    return sorted(ranked[:count])


def read_holdout_ids(path: str | os.PathLike) -> list[str]:
    """Ids from a file: a JSON list, a JSON object with "ids" (holdout.json), or one id a line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--holdout-ids file {path} not found")
    try:
        text = path.read_text()
    except (OSError, ValueError) as err:  # ValueError: bytes that are not UTF-8
        raise UserError(f"cannot read --holdout-ids file {path}: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if isinstance(data, dict):
        data = data.get("ids")
    if not isinstance(data, list) or not all(isinstance(i, str) for i in data):
        raise UserError(f"--holdout-ids file {path} must hold a list of ids, {{\"ids\": [...]}}, or one id a line")
    # "images/x.png" is accepted for "x"
    return sorted({Path(i).stem if "/" in i or Path(i).suffix.lower() in IMAGE_SUFFIXES else i for i in data})


def select_max(keys: Sequence[str], limit: int | None, seed: int) -> set[str]:
    """At most `limit` of the keys, chosen by a seeded hash (deterministic, order-free)."""
    if limit is None or limit >= len(keys):
        return set(keys)
    ranked = sorted(keys, key=lambda k: (stable_int("max-samples", seed, k), k))
    return set(ranked[:limit])


def histogram(values: Iterable[float], bins: int = HIST_BINS) -> tuple[list[float], list[int]]:
    """Counts of values in `bins` equal bins over [0, 1] (the last bin includes 1.0)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, _ = np.histogram(np.asarray(list(values), dtype=float), bins=edges)
    return [round(float(e), 4) for e in edges], [int(c) for c in counts]


def text_histogram(edges: Sequence[float], counts: Sequence[int], kept: Sequence[int],
                   min_gap: float, width: int = 40) -> str:
    """A terminal histogram: '#' kept pairs, '.' dropped ones, one line per bin."""
    top = max(max(counts, default=0), 1)
    lines = [f"gap histogram (# kept, . dropped; min-gap {min_gap:g})"]
    for i, total in enumerate(counts):
        n_kept = kept[i]
        bar_total = int(round(width * total / top))
        bar_kept = int(round(width * n_kept / top))
        bar = "#" * bar_kept + "." * max(bar_total - bar_kept, 0)
        closing = "]" if i == len(counts) - 1 else ")"
        lines.append(f"  [{edges[i]:.1f}, {edges[i + 1]:.1f}{closing} {bar:<{width}} {n_kept}/{total}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inputs


@dataclass
class Sample:
    id: str
    image: str  # relative to the data folder, posix
    mask: str
    rejected: str | None  # DIR/rejected_masks/NAME.png when it exists
    fov: str | None
    size: tuple[int, int]  # (height, width)


@dataclass
class Skipped:
    id: str
    file: str
    reason: str


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def check_data_folder(data: Path) -> None:
    """The data folder exists and holds images/ and masks/."""
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist")
    for name in ("images", "masks"):
        if not (data / name).is_dir():
            raise UserError(f"data folder {data} has no {name}/ folder (expected images/ and masks/)")


def discover(data: Path, skip_bad: bool = False) -> tuple[list[Sample], list[Skipped], list[str]]:
    """Find and check every image of DATA/images with its mask (and given rejected mask, FOV).

    Each problem (missing or unreadable file, size mismatch, non-binary mask, empty ground
    truth, a path leaving DATA, two images with one name) raises a UserError naming the file,
    or with skip_bad is recorded and the image left out. Returns (samples, skipped, ignored
    files in images/ that are not images).
    """
    check_data_folder(data)
    images_dir = data / "images"
    root = data.resolve()
    files = sorted(p for p in images_dir.iterdir() if not p.name.startswith("."))
    ignored = [_rel(data, p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file()]
    files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise UserError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)

    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for stem in sorted(by_stem):
        try:
            samples.append(_check_sample(data, root, stem, by_stem[stem]))
        except UserError as err:
            if not skip_bad:
                raise UserError(f"{err} (pass --skip-bad to leave such images out)") from err
            bad_file = getattr(err, "file", None) or _rel(data, by_stem[stem][0])
            skipped.append(Skipped(id=stem, file=bad_file, reason=str(err)))
    return samples, skipped, ignored


class _BadFile(UserError):
    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


def _check_sample(data: Path, root: Path, stem: str, paths: list[Path]) -> Sample:
    if len(paths) > 1:
        names = ", ".join(_rel(data, p) for p in paths)
        raise _BadFile(f"two images share the name {stem!r} ({names}); their masks would collide",
                       _rel(data, paths[0]))
    image_rel = _rel(data, paths[0])
    mask_path = _checked(lambda: find_named(data / "masks", stem), f"masks/{stem}.png")
    mask_rel = _rel(data, mask_path) if mask_path is not None else f"masks/{stem}.png"
    _checked(lambda: safe_join(root, image_rel, f"image {image_rel}"), image_rel)
    image = _checked(lambda: read_rgb(data / image_rel), image_rel)
    height, width = image.shape[:2]
    if not (data / mask_rel).is_file():
        raise _BadFile(f"image {data / image_rel} has no mask {data / mask_rel}", mask_rel)
    _checked(lambda: safe_join(root, mask_rel, f"mask {mask_rel}"), mask_rel)
    gt = _checked(lambda: read_mask(data / mask_rel), mask_rel)
    _same_size(data, gt, mask_rel, image_rel, (height, width))
    if not gt.any():
        raise _BadFile(f"mask {data / mask_rel} is empty (no vessel pixel): a pair needs a non-empty "
                       "ground truth", mask_rel)
    found = _checked(lambda: find_named(data / "rejected_masks", stem), f"rejected_masks/{stem}.png")
    rejected_rel: str | None = _rel(data, found) if found is not None else None
    if rejected_rel is not None:
        _checked(lambda: safe_join(root, rejected_rel, f"rejected mask {rejected_rel}"), rejected_rel)
        rejected = _checked(lambda: read_mask(data / rejected_rel), rejected_rel)
        _same_size(data, rejected, rejected_rel, image_rel, (height, width))
    found = _checked(lambda: find_named(data / "fov", stem), f"fov/{stem}.png")
    fov_rel: str | None = _rel(data, found) if found is not None else None
    if fov_rel is not None:
        _checked(lambda: safe_join(root, fov_rel, f"fov mask {fov_rel}"), fov_rel)
        fov = _checked(lambda: read_mask(data / fov_rel), fov_rel)
        _same_size(data, fov, fov_rel, image_rel, (height, width))
    return Sample(stem, image_rel, mask_rel, rejected_rel, fov_rel, (height, width))


def _checked(read: Callable[[], Any], rel: str) -> Any:
    try:
        return read()
    except _BadFile:
        raise
    except UserError as err:
        raise _BadFile(str(err), rel) from err


def _same_size(data: Path, mask: np.ndarray, mask_rel: str, image_rel: str, size: tuple[int, int]) -> None:
    if mask.shape != size:
        raise _BadFile(f"mask {data / mask_rel} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                       f"{data / image_rel} is {size[1]}x{size[0]}", mask_rel)


# ----------------------------------------------------------------------------- the computation


@dataclass
class Options:
    min_gap: float
    max_gap: float = 1.0
    sources: tuple[str, ...] = ("given",)
    thresholds: tuple[float, ...] = (0.5,)
    perturbations: tuple[str, ...] = DEFAULT_PERTURBATIONS
    perturb_variants: int = 1
    max_samples: int | None = None
    holdout: float = 0.0
    holdout_ids: list[str] | None = None
    seed: int = 0
    skip_bad: bool = False


@dataclass
class Candidate:
    image_id: str
    tag: str  # given, model_t0.50, erode, break2, ...
    source: str  # given, model or perturb
    gap: float
    status: str  # kept, gap_below_min, gap_above_max, duplicate, identical_to_chosen, max_samples
    rejected: str | None = None  # relative path of the rejected mask in OUT (kept ones)
    duplicate_of: str | None = None


@dataclass
class Curation:
    data: Path
    options: Options
    samples: list[Sample]
    skipped: list[Skipped]
    ignored: list[str]
    holdout: list[str]
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def pairs(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "kept"]


def validate_options(opts: Options) -> None:
    if not 0.0 <= opts.min_gap <= 1.0:
        raise UserError(f"--min-gap must be in [0, 1], got {opts.min_gap}")
    if not 0.0 <= opts.max_gap <= 1.0 or opts.max_gap < opts.min_gap:
        raise UserError(f"--max-gap must be in [min-gap, 1], got {opts.max_gap} (min-gap {opts.min_gap})")
    unknown = [s for s in opts.sources if s not in SOURCES]
    if unknown or not opts.sources:
        raise UserError(f"--rejected: unknown source {', '.join(unknown) or '(none)'} (known: {', '.join(SOURCES)})")
    bad = [t for t in opts.thresholds if not 0.0 < t < 1.0]
    if bad or not opts.thresholds:
        raise UserError(f"--thresholds must be numbers strictly between 0 and 1, got {list(opts.thresholds)}")
    unknown = [p for p in opts.perturbations if p not in PERTURBATIONS]
    if unknown or ("perturb" in opts.sources and not opts.perturbations):
        raise UserError(f"--perturbations: unknown {', '.join(unknown) or '(none)'} (known: {', '.join(PERTURBATIONS)})")
    if opts.perturb_variants < 1:
        raise UserError(f"--perturb-variants must be >= 1, got {opts.perturb_variants}")
    if opts.max_samples is not None and opts.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {opts.max_samples}")
    if not 0.0 <= opts.holdout <= 1.0:
        raise UserError(f"--holdout must be a fraction in [0, 1], got {opts.holdout}")
    if opts.seed < 0:
        raise UserError(f"--seed must be >= 0, got {opts.seed}")


def rejected_candidates(sample: Sample, gt: np.ndarray, opts: Options, data: Path,
                        probability: np.ndarray | None) -> list[tuple[str, str, np.ndarray]]:
    """(tag, source, mask) for every rejected mask of one image, in a fixed order."""
    out: list[tuple[str, str, np.ndarray]] = []
    for source in opts.sources:
        if source == "given" and sample.rejected is not None:
            out.append(("given", "given", read_mask(data / sample.rejected)))
        elif source == "model" and probability is not None:
            for t in opts.thresholds:
                out.append((model_tag(t), "model", probability > t))
        elif source == "perturb":
            for kind in opts.perturbations:
                for variant in range(1, opts.perturb_variants + 1):
                    out.append((perturb_tag(kind, variant), "perturb",
                                perturb(gt, kind, variant, opts.seed, sample.id)))
    return out


def judge(image_id: str, gt: np.ndarray, masks: list[tuple[str, str, np.ndarray]], opts: Options
          ) -> list[tuple[Candidate, np.ndarray]]:
    """Apply the rules to one image's rejected masks: identical-to-chosen and duplicates are
    dropped (first one wins), then the gap rule."""
    seen: dict[bytes, str] = {}
    judged = []
    for tag, source, mask in masks:
        mask = np.asarray(mask, dtype=bool)
        value = gap(mask, gt)
        key = hashlib.sha256(np.packbits(mask).tobytes()).digest()
        if np.array_equal(mask, gt):
            cand = Candidate(image_id, tag, source, value, "identical_to_chosen")
        elif key in seen:
            cand = Candidate(image_id, tag, source, value, "duplicate", duplicate_of=seen[key])
        else:
            seen[key] = tag
            if value < opts.min_gap:
                status = "gap_below_min"
            elif value > opts.max_gap:
                status = "gap_above_max"
            else:
                status = "kept"
            cand = Candidate(image_id, tag, source, value, status)
        judged.append((cand, mask))
    return judged


def curate(data: Path, opts: Options, predictor: Predictor | None = None, stage: Path | None = None,
           chunk: int = 16, progress: Callable[[int, int], None] | None = None) -> Curation:
    """The whole computation. Reads inputs; writes only kept new rejected masks into `stage`
    (if given; named CURATED_DIR/<id>__<tag>.png relative to the output folder)."""
    validate_options(opts)
    if "model" in opts.sources and predictor is None:
        raise UserError("the model source needs a model: pass --model")
    samples, skipped, ignored = discover(data, opts.skip_bad)
    if not samples:
        raise UserError(f"no usable image in {data}: every one was skipped (see the reasons above)")
    ids = [s.id for s in samples]
    skipped_ids = {s.id for s in skipped}
    if opts.holdout_ids is not None:
        unknown = [i for i in opts.holdout_ids if i not in ids and i not in skipped_ids]
        if unknown:
            raise UserError(f"--holdout-ids names ids with no image in {data / 'images'}: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        holdout = sorted(set(opts.holdout_ids) & set(ids))
    else:
        holdout = split_holdout(ids, opts.holdout, opts.seed)
    held = set(holdout)
    result = Curation(data, opts, samples, skipped, ignored, holdout)
    if "given" in opts.sources and not any(s.rejected for s in samples):
        raise UserError(f"the given source needs rejected masks: {data / 'rejected_masks'} holds none "
                        "for these images")
    work = [s for s in samples if s.id not in held]
    if not work:
        raise UserError("every usable image is held out: lower --holdout")
    for start in range(0, len(work), chunk):
        part = work[start:start + chunk]
        probs: list[np.ndarray | None] = [None] * len(part)
        if "model" in opts.sources:
            assert predictor is not None
            images = [read_rgb(data / s.image) for s in part]
            probs = list(predictor(images))
            for s, p in zip(part, probs):
                if p is None or np.shape(p) != s.size:
                    raise RuntimeError(f"the model returned a probability map of shape {np.shape(p)} for "
                                       f"{s.image} of size {s.size}")
        for sample, prob in zip(part, probs):
            gt = read_mask(data / sample.mask)
            masks = rejected_candidates(sample, gt, opts, data, prob)
            for cand, mask in judge(sample.id, gt, masks, opts):
                if cand.status == "kept":
                    if cand.source == "given":
                        cand.rejected = sample.rejected
                    else:
                        cand.rejected = f"{CURATED_DIR}/{sample.id}__{cand.tag}.png"
                        if stage is not None:
                            write_mask(stage / cand.rejected, mask)
                result.candidates.append(cand)
        if progress is not None:
            progress(min(start + chunk, len(work)), len(work))
    kept_keys = [f"{c.image_id}__{c.tag}" for c in result.pairs]
    chosen = select_max(kept_keys, opts.max_samples, opts.seed)
    for c in result.pairs:
        if f"{c.image_id}__{c.tag}" not in chosen:
            c.status = "max_samples"
    return result


# ----------------------------------------------------------------------------- outputs


def annotations(result: Curation) -> list[dict[str, Any]]:
    by_id = {s.id: s for s in result.samples}
    return [
        {
            "id": f"{c.image_id}__{c.tag}",
            "image": by_id[c.image_id].image,
            "chosen_mask": by_id[c.image_id].mask,
            "rejected_mask": c.rejected,
            "gap": round(c.gap, 6),
            "source": c.source if c.source == "given" else f"{c.source}:{c.tag.removeprefix('model_')}",
        }
        for c in result.pairs
    ]


def holdout_record(result: Curation) -> dict[str, Any]:
    by_id = {s.id: s for s in result.samples}
    return {
        "ids": list(result.holdout),
        "images": [by_id[i].image for i in result.holdout],
        "masks": [by_id[i].mask for i in result.holdout],
    }


def build_report(result: Curation, arguments: dict[str, Any], out: Path) -> dict[str, Any]:
    opts = result.options
    cands = result.candidates
    statuses = ["kept", "gap_below_min", "gap_above_max", "duplicate", "identical_to_chosen", "max_samples"]
    counted = [c for c in cands if c.status not in ("duplicate", "identical_to_chosen")]
    edges, all_counts = histogram(c.gap for c in counted)
    _, kept_counts = histogram(c.gap for c in result.pairs)
    per_source: dict[str, dict[str, Any]] = {}
    for c in cands:
        row = per_source.setdefault(c.tag, {"source": c.source, "candidates": 0, **{s: 0 for s in statuses}})
        row["candidates"] += 1
        row[c.status] += 1
    for tag, row in per_source.items():
        gaps = [c.gap for c in cands if c.tag == tag and c.status not in ("duplicate", "identical_to_chosen")]
        kept = [c.gap for c in result.pairs if c.tag == tag]
        row["mean_gap"] = round(float(np.mean(gaps)), 6) if gaps else None
        row["mean_gap_kept"] = round(float(np.mean(kept)), 6) if kept else None
    images: dict[str, dict[str, Any]] = {}
    for c in cands:
        entry: dict[str, Any] = {"gap": round(c.gap, 6), "status": c.status}
        if c.duplicate_of:
            entry["duplicate_of"] = c.duplicate_of
        images.setdefault(c.image_id, {})[c.tag] = entry
    return {
        "data": str(result.data),
        "out": str(out),
        "rule": "chosen = ground truth; gap = 1 - Dice(rejected, chosen); kept if min_gap <= gap <= max_gap",
        "min_gap": opts.min_gap,
        "max_gap": opts.max_gap,
        "seed": opts.seed,
        "sources": list(opts.sources),
        "thresholds": list(opts.thresholds) if "model" in opts.sources else [],
        "perturbations": list(opts.perturbations) if "perturb" in opts.sources else [],
        "perturb_variants": opts.perturb_variants,
        "counts": {
            "images_found": len(result.samples) + len(result.skipped),
            "images_usable": len(result.samples),
            "images_skipped_bad": len(result.skipped),
            "images_held_out": len(result.holdout),
            "images_used": len(result.samples) - len(result.holdout),
            "images_with_pairs": len({c.image_id for c in result.pairs}),
            "candidates": len(cands),
            **{s: sum(c.status == s for c in cands) for s in statuses},
            "pairs": len(result.pairs),
        },
        "per_source": per_source,
        "gap_histogram": {"edges": edges, "counts": all_counts, "kept": kept_counts,
                          "note": "gaps of every distinct candidate (duplicates and copies of the chosen mask left out)"},
        "images": images,
        "holdout": {"fraction": None if opts.holdout_ids is not None else opts.holdout,
                    "from_file": opts.holdout_ids is not None, "ids": list(result.holdout)},
        "skipped": [{"id": s.id, "file": s.file, "reason": s.reason} for s in result.skipped],
        "ignored_files": result.ignored,
        "arguments": arguments,
    }


def plan_output(data: Path, out: Path, overwrite: bool) -> bool:
    """Check where the output may go before any work. Returns True when out is the data folder.

    out == data: only dpo_annotations.json, holdout.json, curation_report.json and
    curated_rejected/ are written there. out != data: out must be new or empty (or, with
    overwrite, an earlier curation output) and must not hold the data folder or sit inside one
    of its input folders; the files the pairs need are copied into it.
    """
    d, o = data.resolve(), out.resolve()
    if o == d:
        if (data / ANNOTATIONS).exists() and not overwrite:
            raise UserError(f"{data / ANNOTATIONS} already exists; pass --overwrite to replace it "
                            f"(or --out DIR for a new pair folder)")
        curated = data / CURATED_DIR
        if curated.is_dir() and any(curated.iterdir()) and not overwrite:
            raise UserError(f"{curated} already exists; pass --overwrite to replace it")
        return True
    if o in d.parents:
        raise UserError(f"--out {out} holds the data folder {data}; choose a folder outside it")
    for name in INPUT_DIRS:
        folder = (data / name).resolve()
        if o == folder or folder in o.parents:
            raise UserError(f"--out {out} is inside the input folder {data / name}; it would mix outputs "
                            "with inputs")
    if o.exists():
        if not o.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        if any(o.iterdir()):
            if not overwrite:
                raise UserError(f"--out {out} already exists and is not empty"
                                + (f" (it holds {ANNOTATIONS})" if (o / ANNOTATIONS).exists() else "")
                                + "; pass --overwrite to replace an earlier curation output")
            if not (o / REPORT).exists():
                raise UserError(f"--out {out} is not empty and is not an earlier curate_data.py output "
                                f"(no {REPORT}); choose a new or empty folder")
    return False


def write_outputs(result: Curation, out: Path, stage: Path, report: dict[str, Any]) -> None:
    """Put staged files into place, then the JSON files, the pair file last.

    Inputs are never written. out == data: the old pair file is removed first (with
    --overwrite), the curated_rejected/ folder swapped in whole, then holdout.json, the report
    and the pair file. out != data: a complete folder is built beside out and renamed onto it.
    """
    data = result.data
    pairs = annotations(result)
    selected = {p["rejected_mask"] for p in pairs if p["rejected_mask"].startswith(CURATED_DIR + "/")}
    staged_curated = stage / CURATED_DIR
    if staged_curated.is_dir():  # drop staged masks that --max-samples left out
        for f in staged_curated.iterdir():
            if f"{CURATED_DIR}/{f.name}" not in selected:
                f.unlink()
    if data.resolve() == out.resolve():
        inputs = [(data / name).resolve() for name in INPUT_DIRS]
        targets = [(out / CURATED_DIR).resolve(), (out / ANNOTATIONS).resolve()]
        for t in targets:
            if any(t == i or i in t.parents for i in inputs):  # pragma: no cover - names are fixed
                raise UserError(f"refusing to write {t}: it is an input")
        (out / ANNOTATIONS).unlink(missing_ok=True)
        if staged_curated.is_dir():
            _open_modes(staged_curated)
        _swap_dir(staged_curated if staged_curated.is_dir() else None, out / CURATED_DIR)
        for name, obj in ((HOLDOUT, holdout_record(result)), (REPORT, report), (ANNOTATIONS, pairs)):
            write_json(out / name, obj)
            _open_modes(out / name)
        return
    # out != data: stage the copies too, then move the whole folder into place
    by_id = {s.id: s for s in result.samples}
    needed: set[str] = set()
    for p in pairs:
        needed.update([p["image"], p["chosen_mask"]])
        if not p["rejected_mask"].startswith(CURATED_DIR + "/"):
            needed.add(p["rejected_mask"])
    for i in result.holdout:
        needed.update([by_id[i].image, by_id[i].mask])
    for s in result.samples:
        if s.fov and (s.image in needed):
            needed.add(s.fov)
    for rel in sorted(needed):
        dest = stage / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / rel, dest)
    write_json(stage / HOLDOUT, holdout_record(result))
    write_json(stage / REPORT, report)
    write_json(stage / ANNOTATIONS, pairs)
    _open_modes(stage)
    _swap_dir(stage, out)


def _open_modes(root: Path) -> None:
    """Temporary files and folders are created private (0600/0700); give outputs normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for path in paths:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_dir(new: Path | None, dest: Path) -> None:
    """Replace folder dest by new (or just remove dest when new is None), old one removed last."""
    old = dest.parent / f".{dest.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    if new is not None:
        os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def make_stage(out: Path, same_as_data: bool) -> Path:
    """A temporary folder on the output's file system (so renames are atomic)."""
    parent = out if same_as_data else out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.curate.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise UserError(f"cannot write to {parent}: {err.strerror}") from err
    try:
        check_writable_dir(stage)  # a full disk fails here, before any work, not half-way
    except UserError as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise UserError(f"cannot write to {parent}: {getattr(err.__cause__, 'strerror', err)}") from err
    return stage


__all__ = [
    "ANNOTATIONS", "CURATED_DIR", "HOLDOUT", "PERTURBATIONS", "REPORT", "SOURCES", "Candidate", "Curation",
    "Options", "Sample", "Skipped", "annotations", "break_vessels", "build_report", "check_data_folder",
    "curate", "dice",
    "dilate", "discover", "drop_thin", "erode", "gap", "histogram", "holdout_record", "judge",
    "make_stage", "perturb", "plan_output", "read_holdout_ids", "rejected_candidates", "select_max",
    "split_holdout", "text_histogram", "write_outputs",
]
