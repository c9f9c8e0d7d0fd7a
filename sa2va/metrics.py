"""Per-image vessel metrics and the paired statistics that say whether a change is real.

Per image: Dice, IoU, precision, recall, specificity, clDice (centreline Dice, the usual
topology-aware vessel metric) and the connected-component count error, all optionally
restricted to a field-of-view mask.

Empty-mask convention (one rule for every ratio): a ratio whose denominator is 0 is 1.0 when
the prediction agrees with the ground truth everywhere inside the FOV (FP = FN = 0), else 0.0.
So both masks empty => every overlap metric is 1.0; an empty prediction on a non-empty truth
scores 0 on everything (precision included); a non-empty prediction on an empty truth scores
0 on everything (recall included: there was nothing to find, and a score of 1.0 would reward
hallucinated vessels); a truth covering the whole FOV gives specificity 1.0 only for an
exactly matching prediction. Pooled (micro) metrics use the same rule on summed counts.

Over images: `summarize` gives mean, median, std, a percentile-bootstrap CI of the mean and
the pooled value; `paired_compare` pairs two result sets image by image (bootstrap CI of the
mean difference, Wilcoxon signed-rank p, the number of images a difference of this size
would need) and writes one plain sentence. See docs/metrics.md.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage, stats
from skimage.morphology import skeletonize

from .errors import UserError

METRICS = ("dice", "iou", "precision", "recall", "specificity", "cldice", "components_error")
DISPLAY_NAMES = {
    "dice": "Dice",
    "iou": "IoU",
    "precision": "precision",
    "recall": "recall",
    "specificity": "specificity",
    "cldice": "clDice",
    "components_error": "components error",
}
LOWER_IS_BETTER = {"components_error"}
COUNT_KEYS = ("tp", "fp", "fn", "tn")
SKELETON_KEYS = ("skel_pred", "skel_pred_in_gt", "skel_gt", "skel_gt_in_pred")
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity: vessels touching diagonally are one vessel
_ZERO_TOL = 1e-12  # paired differences smaller than this are float noise, not a change


def _as_mask(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    # 0/1 integers or floats are fine; a probability map is refused rather than thresholded here.
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise UserError(f"{what} is not a binary mask (dtype {arr.dtype}, values other than 0 and 1)")
    return arr.astype(bool)


def _masks(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, g = _as_mask(pred, "prediction"), _as_mask(gt, "ground truth")
    if p.shape != g.shape or p.ndim != 2:
        raise UserError(f"prediction {p.shape} and ground truth {g.shape} must be 2-D masks of one size")
    if fov is None:
        f = np.ones_like(g)
    else:
        f = _as_mask(fov, "field of view")
        if f.shape != g.shape:
            raise UserError(f"field of view {f.shape} does not match the masks {g.shape}")
        if not f.any():
            raise UserError("field of view is empty: no pixel would be scored")
    return p & f, g & f, f


def _ratio(num: float, den: float, perfect: bool) -> float:
    if den == 0:
        return 1.0 if perfect else 0.0
    return float(num) / float(den)


def confusion(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> dict[str, int]:
    """Pixel counts inside the FOV: tp, fp, fn, tn."""
    p, g, f = _masks(pred, gt, fov)
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p & ~g))
    fn = int(np.count_nonzero(~p & g))
    tn = int(np.count_nonzero(f)) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _scores(c: Mapping[str, float]) -> dict[str, float]:
    """Overlap metrics and clDice from (possibly summed) counts, with the empty-mask rule."""
    tp, fp, fn, tn = (c[k] for k in COUNT_KEYS)
    perfect = fp == 0 and fn == 0
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, perfect),
        "iou": _ratio(tp, tp + fp + fn, perfect),
        "precision": _ratio(tp, tp + fp, perfect),
        "recall": _ratio(tp, tp + fn, perfect),
        "specificity": _ratio(tn, tn + fp, perfect),
    }
    if all(k in c for k in SKELETON_KEYS):
        t_prec = _ratio(c["skel_pred_in_gt"], c["skel_pred"], perfect)
        t_sens = _ratio(c["skel_gt_in_pred"], c["skel_gt"], perfect)
        out["cldice"] = _ratio(2 * t_prec * t_sens, t_prec + t_sens, perfect)
    return out


def image_metrics(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> dict[str, float]:
    """All per-image metrics of a predicted mask against the truth, inside an optional FOV.

    Keys: dice, iou, precision, recall, specificity, cldice, components_error, plus the counts
    tp, fp, fn, tn, skel_pred, skel_pred_in_gt, skel_gt, skel_gt_in_pred, components_pred,
    components_gt (kept so that `summarize` can pool over images).

    clDice: Tprec = |skel(pred) & gt| / |skel(pred)|, Tsens = |skel(gt) & pred| / |skel(gt)|,
    clDice = 2 Tprec Tsens / (Tprec + Tsens), skeletons from skimage's `skeletonize` of the
    FOV-restricted masks. components_error = |#components(pred) - #components(gt)|, 8-connected.
    A ratio with denominator 0 is 1.0 if FP = FN = 0 (masks agree), else 0.0; so both empty
    gives 1.0 everywhere, and an empty prediction or an empty truth (not both) gives 0.0.
    """
    p, g, f = _masks(pred, gt, fov)
    counts: dict[str, float] = confusion(p, g, f)
    sp = skeletonize(p) if p.any() else p
    sg = skeletonize(g) if g.any() else g
    counts.update(
        skel_pred=int(np.count_nonzero(sp)),
        skel_pred_in_gt=int(np.count_nonzero(sp & g)),
        skel_gt=int(np.count_nonzero(sg)),
        skel_gt_in_pred=int(np.count_nonzero(sg & p)),
        components_pred=int(ndimage.label(p, structure=_EIGHT)[1]),
        components_gt=int(ndimage.label(g, structure=_EIGHT)[1]),
    )
    out: dict[str, float] = _scores(counts)
    out["components_error"] = float(abs(counts["components_pred"] - counts["components_gt"]))
    out.update(counts)
    return out


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples (with replacement) of the last axis; rows are metrics."""
    n = values.shape[-1]
    out = np.empty(values.shape[:-1] + (n_boot,))
    chunk = max(1, 4_000_000 // max(n, 1))  # bound the index matrix's memory for large n
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[..., start:stop] = values[..., idx].mean(axis=-1)
    return out


def _values(rows: Sequence[Mapping[str, float]], metric: str) -> np.ndarray:
    vals = []
    for i, row in enumerate(rows):
        if metric not in row or row[metric] is None:
            raise UserError(f"result row {i} has no value for metric {metric!r}")
        vals.append(float(row[metric]))
    arr = np.asarray(vals)
    if not np.isfinite(arr).all():
        raise UserError(f"metric {metric!r} has non-finite values in rows {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
    return arr


def _pooled(rows: Sequence[Mapping[str, float]], metric: str) -> float | None:
    if metric not in ("dice", "iou", "precision", "recall", "specificity", "cldice"):
        return None  # e.g. components error: summing counts over images means nothing
    needed = COUNT_KEYS + (SKELETON_KEYS if metric == "cldice" else ())
    if not all(all(k in row for k in needed) for row in rows):
        return None
    summed = {k: sum(int(row[k]) for row in rows) for k in needed}
    return _scores(summed)[metric]


def summarize(
    rows: Sequence[Mapping[str, float]],
    metrics: Iterable[str] = METRICS,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float | int | None]]:
    """Per metric over images: mean, median, std, ci_low/ci_high (95% bootstrap of the mean), n, pooled.

    `pooled` is the micro average from counts summed over images (None for components_error
    or when the rows carry no counts). One resampling of images is shared by all metrics.
    """
    rows = list(rows)
    metrics = list(metrics)
    if not rows:
        raise UserError("no result rows to summarise")
    if n_boot < 1:
        raise UserError(f"n_boot must be at least 1, got {n_boot}")
    values = np.stack([_values(rows, m) for m in metrics])
    boot = _bootstrap_means(values, n_boot, np.random.default_rng(seed))
    lows, highs = np.percentile(boot, [2.5, 97.5], axis=-1)
    n = len(rows)
    out: dict[str, dict[str, float | int | None]] = {}
    for i, m in enumerate(metrics):
        v = values[i]
        out[m] = {
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "std": float(v.std(ddof=1)) if n > 1 else 0.0,
            "ci_low": float(lows[i]),
            "ci_high": float(highs[i]),
            "n": n,
            "pooled": _pooled(rows, m),
        }
    return out


def _differing(a: Mapping[str, float], b: Mapping[str, float], name_a: str, name_b: str) -> str:
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))

    def shown(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (f", ... ({len(ids) - 5} more)" if len(ids) > 5 else "")

    parts = []
    if only_a:
        parts.append(f"{len(only_a)} only in {name_a} ({shown(only_a)})")
    if only_b:
        parts.append(f"{len(only_b)} only in {name_b} ({shown(only_b)})")
    common = len(set(a) & set(b))
    return f"{name_a} and {name_b} cover different images: " + "; ".join(parts) + f"; {common} in both"


def _wilcoxon_p(d: np.ndarray) -> float:
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 1.0  # no image changed: no evidence of any difference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about tiny samples; the exact test handles them
        res = stats.wilcoxon(nonzero, alternative="two-sided")
    p = float(res.pvalue)
    return 1.0 if not math.isfinite(p) else min(1.0, p)


def _min_pairs_for(alpha: float) -> int:
    """Fewest non-zero pairs for which the exact two-sided signed-rank test can reach p < alpha."""
    n = 1
    while 2.0 / 2**n >= alpha:
        n += 1
    return n


def _decimals(*magnitudes: float) -> int:
    """Decimals that show the smallest non-zero magnitude with one significant digit (2..6)."""
    mags = [abs(m) for m in magnitudes if m and math.isfinite(m)]
    if not mags:
        return 3
    return int(min(6, max(2, -math.floor(math.log10(min(mags))))))


def _fmt_p(p: float) -> str:
    if p < 1e-4:
        return "p < 0.0001"
    text = f"{p:.2g}"
    if "e" in text:
        text = f"{p:.4f}"
    return "p = " + (text if "." in text else text + ".0")


def paired_compare(
    a: Mapping[str, float],
    b: Mapping[str, float],
    metric: str = "dice",
    n_boot: int = 5000,
    seed: int = 0,
    alpha: float = 0.05,
    power: float = 0.8,
    *,
    name_a: str = "A",
    name_b: str = "B",
) -> dict[str, object]:
    """Compare two per-image result sets (image name -> metric value) image by image.

    Returns n, mean_a, mean_b, mean_diff (b - a), ci_low/ci_high (paired bootstrap of the mean
    difference), p (two-sided Wilcoxon signed-rank; 1.0 when no difference is non-zero),
    significant (p < alpha and the CI excludes 0), n_needed (images needed to detect the
    observed |mean_diff|, or 0.001 if it is 0, at this power and alpha under a paired normal
    approximation; None when the differences do not vary) and a one-line sentence.
    Refuses (UserError) two sets that do not cover the same images.
    """
    if set(a) != set(b):
        raise UserError(_differing(a, b, name_a, name_b))
    if not a:
        raise UserError("no images to compare")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise UserError(f"alpha and power must lie between 0 and 1, got {alpha} and {power}")
    names = sorted(a)
    va = np.array([float(a[k]) for k in names])
    vb = np.array([float(b[k]) for k in names])
    bad = [names[i] for i in np.flatnonzero(~(np.isfinite(va) & np.isfinite(vb)))]
    if bad:
        raise UserError(f"non-finite {metric} values for images {', '.join(bad[:5])}")
    d = vb - va
    d[np.abs(d) < _ZERO_TOL] = 0.0
    n = d.size
    mean_diff = float(d.mean())
    boot = _bootstrap_means(d, n_boot, np.random.default_rng(seed))
    ci_low, ci_high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    p = _wilcoxon_p(d)
    significant = bool(p < alpha and (ci_low > 0 or ci_high < 0))

    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    delta = abs(mean_diff) if mean_diff != 0 else 0.001
    n_needed = None
    if sd > 0:
        z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
        # The normal formula can say 2 or 3, but the signed-rank test cannot reach alpha below this.
        n_needed = max(math.ceil((z * sd / delta) ** 2), _min_pairs_for(alpha))

    label = DISPLAY_NAMES.get(metric, metric)
    dec = _decimals(mean_diff, (ci_high - ci_low) / 2)
    conf = f"{round(100 * (1 - alpha))}% CI"
    images = f"{n} image" + ("" if n == 1 else "s")
    if significant:
        b_better = (mean_diff < 0) if metric in LOWER_IS_BETTER else (mean_diff > 0)
        winner, loser = (name_b, name_a) if b_better else (name_a, name_b)
        # Report the winner's margin as a positive number, its CI turned the same way.
        lo, hi = (ci_low, ci_high) if mean_diff > 0 else (-ci_high, -ci_low)
        lower = "lower is better; " if metric in LOWER_IS_BETTER else ""
        sentence = (
            f"{winner} beats {loser} by {abs(mean_diff):.{dec}f} {label} "
            f"({lower}{conf} {lo:.{dec}f} to {hi:.{dec}f}, {_fmt_p(p)})"
        )
    elif not d.any():
        sentence = f"no difference in {label} on {images}: {name_a} and {name_b} score the same on every image"
    else:
        sentence = (
            f"no detectable difference in {label} on {images} (mean difference {name_b} - {name_a} "
            f"{mean_diff:+.{dec}f}, {conf} {ci_low:.{dec}f} to {ci_high:.{dec}f}, {_fmt_p(p)}); "
        )
        if n_needed is None:
            sentence += "the differences do not vary between images, so no sample size can be estimated"
        else:
            # Two significant digits: the size to detect should not be rounded away.
            sentence += f"about {n_needed} images would be needed to detect {delta:.{_decimals(delta) + 1}f}"
    return {
        "metric": metric,
        "n": n,
        "mean_a": float(va.mean()),
        "mean_b": float(vb.mean()),
        "mean_diff": mean_diff,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p": p,
        "significant": significant,
        "n_needed": n_needed,
        "sentence": sentence,
    }
