"""Per-image metrics on hand-built masks with known counts, and the paired statistics."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from sa2va.errors import UserError
from sa2va.metrics import (
    LOWER_IS_BETTER,
    METRICS,
    confusion,
    image_metrics,
    paired_compare,
    summarize,
)

OVERLAP = ("dice", "iou", "precision", "recall", "specificity", "cldice")


def blank(shape=(32, 32)) -> np.ndarray:
    return np.zeros(shape, bool)


def square(top: int, left: int, side: int, shape=(32, 32)) -> np.ndarray:
    m = blank(shape)
    m[top : top + side, left : left + side] = True
    return m


# --- per image -------------------------------------------------------------------------------


def test_both_empty_scores_one_everywhere():
    m = image_metrics(blank(), blank())
    assert {k: m[k] for k in OVERLAP} == {k: 1.0 for k in OVERLAP}
    assert m["components_error"] == 0.0
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 0, 0, 32 * 32)


def test_empty_prediction_on_vessels_scores_zero_but_full_specificity():
    gt = square(4, 4, 5)
    m = image_metrics(blank(), gt)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 25)
    for k in ("dice", "iou", "precision", "recall", "cldice"):
        assert m[k] == 0.0, k
    assert m["specificity"] == 1.0
    assert m["components_error"] == 1.0


def test_prediction_on_empty_truth_scores_zero_including_recall():
    # Documented choice: a 0/0 ratio is 1.0 only when the masks agree; nothing to find is not a hit.
    pred = square(4, 4, 5)
    m = image_metrics(pred, blank())
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 25, 0, 32 * 32 - 25)
    for k in ("dice", "iou", "precision", "recall", "cldice"):
        assert m[k] == 0.0, k
    assert m["specificity"] == pytest.approx((32 * 32 - 25) / (32 * 32))


def test_full_masks_and_specificity_without_negatives():
    full = np.ones((16, 16), bool)
    m = image_metrics(full, full)
    assert {k: m[k] for k in OVERLAP} == {k: 1.0 for k in OVERLAP}
    almost = full.copy()
    almost[0, 0] = False
    m = image_metrics(almost, full)
    assert m["recall"] == pytest.approx(255 / 256)
    assert m["specificity"] == 0.0  # no negatives to judge and the masks disagree


def test_single_pixel_hit_and_miss():
    a = blank()
    a[10, 10] = True
    b = blank()
    b[10, 11] = True
    assert image_metrics(a, a)["dice"] == 1.0
    m = image_metrics(a, b)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    assert m["dice"] == 0.0 and m["iou"] == 0.0


def test_shifted_square_known_counts():
    gt = square(5, 5, 10)
    pred = square(5, 7, 10)  # shifted 2 columns: 80 overlap, 20 extra, 20 missed
    c = confusion(pred, gt)
    assert c == {"tp": 80, "fp": 20, "fn": 20, "tn": 32 * 32 - 120}
    m = image_metrics(pred, gt)
    assert m["dice"] == pytest.approx(160 / 200)
    assert m["iou"] == pytest.approx(80 / 120)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx((32 * 32 - 120) / (32 * 32 - 100))


def test_fov_restricts_every_count():
    gt = square(5, 5, 10)
    pred = gt.copy()
    pred[25:30, 25:30] = True  # 25 false positives, all outside the FOV below
    fov = blank()
    fov[:20, :20] = True
    m = image_metrics(pred, gt, fov)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (100, 0, 0, 400 - 100)
    assert m["dice"] == 1.0 and m["components_error"] == 0.0
    assert image_metrics(pred, gt)["fp"] == 25


def test_bad_inputs_are_refused():
    with pytest.raises(UserError, match="one size"):
        image_metrics(blank((8, 8)), blank((8, 9)))
    with pytest.raises(UserError, match="not a binary mask"):
        image_metrics(np.full((8, 8), 0.7), blank((8, 8)))
    with pytest.raises(UserError, match="field of view is empty"):
        image_metrics(blank(), blank(), fov=blank())
    # 0/1 integers are accepted as masks.
    assert image_metrics(square(2, 2, 3).astype(np.uint8), square(2, 2, 3))["dice"] == 1.0


def hline(row: int, c0: int, c1: int, shape=(40, 60)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[row, c0:c1] = True
    return m


def test_cldice_on_thin_lines():
    line = hline(20, 5, 55)
    assert image_metrics(line, line)["cldice"] == 1.0
    m = image_metrics(hline(23, 5, 55), line)  # parallel, 3 px away
    assert m["cldice"] == 0.0 and m["dice"] == 0.0


def test_missing_thin_vessels_cost_more_cldice_than_dice():
    thick = np.zeros((50, 60), bool)
    thick[10:17, 5:55] = True  # a 7-px trunk
    gt = thick.copy()
    gt[30, 5:55] = True  # two 1-px capillaries
    gt[40, 5:55] = True
    m = image_metrics(thick, gt)  # the prediction finds only the trunk
    assert m["dice"] == pytest.approx(2 * 350 / (2 * 350 + 100))
    assert m["cldice"] < m["dice"] - 0.2  # topology: two of three vessels are missing


def test_broken_line_is_a_components_error():
    line = hline(20, 5, 55)
    broken = line.copy()
    broken[20, 30] = False  # one pixel gap
    m = image_metrics(broken, line)
    assert m["dice"] > 0.98
    assert m["components_error"] == 1.0
    assert (m["components_pred"], m["components_gt"]) == (2, 1)


def test_components_are_eight_connected():
    diag = np.eye(10, dtype=bool)
    m = image_metrics(diag, diag)
    assert m["components_pred"] == 1
    two = square(2, 2, 3) | square(20, 20, 3)
    assert image_metrics(two, square(2, 2, 3))["components_error"] == 1.0


# --- summarize -------------------------------------------------------------------------------


def test_summarize_mean_ci_and_pooled_differ():
    big = square(0, 0, 30, shape=(40, 40))
    small_gt = square(35, 35, 2, shape=(40, 40))
    small_pred = square(30, 30, 2, shape=(40, 40))
    rows = [image_metrics(big, big), image_metrics(small_pred, small_gt)]
    s = summarize(rows, n_boot=500)
    assert set(s) == set(METRICS)
    d = s["dice"]
    assert d["mean"] == pytest.approx(0.5)
    assert d["n"] == 2
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    # Micro pooling: the big image's 900 true positives swamp the small one's 8 errors.
    assert d["pooled"] == pytest.approx(1800 / (1800 + 8))
    assert s["components_error"]["pooled"] is None
    assert s["cldice"]["pooled"] is not None


def test_summarize_bootstrap_is_seeded():
    rng = np.random.default_rng(3)
    rows = [{"dice": float(v)} for v in rng.uniform(0.7, 0.9, size=30)]
    s1 = summarize(rows, metrics=("dice",), seed=1)
    s2 = summarize(rows, metrics=("dice",), seed=1)
    assert s1 == s2
    d = s1["dice"]
    assert d["ci_low"] < d["mean"] < d["ci_high"]
    assert d["pooled"] is None  # no counts in these rows
    assert d["std"] == pytest.approx(np.std([r["dice"] for r in rows], ddof=1))


def test_summarize_refuses_missing_metric():
    with pytest.raises(UserError, match="cldice"):
        summarize([{"dice": 0.5}], metrics=("dice", "cldice"))
    with pytest.raises(UserError, match="no result rows"):
        summarize([])


# --- paired_compare --------------------------------------------------------------------------


def results(n: int, seed: int, shift: float = 0.0, noise: float = 0.0, base=None):
    rng = np.random.default_rng(seed)
    names = [f"img{i:03d}" for i in range(n)]
    if base is None:
        return {k: float(v) for k, v in zip(names, rng.uniform(0.75, 0.85, size=n))}
    return {k: base[k] + shift + float(noise * rng.normal()) for k in names}


def test_identical_results_show_no_difference():
    a = results(10, seed=0)
    r = paired_compare(a, dict(a))
    assert r["mean_diff"] == 0.0
    assert r["ci_low"] <= 0.0 <= r["ci_high"]
    assert r["p"] == 1.0
    assert r["significant"] is False
    assert r["n_needed"] is None  # differences do not vary
    assert "no difference in Dice on 10 images" in r["sentence"]


def test_constant_shift_is_significant_with_right_sign_and_sentence():
    a = results(50, seed=0)
    b = results(50, seed=1, shift=0.01, noise=0.002, base=a)
    r = paired_compare(a, b, name_a="v6", name_b="v8")
    assert r["n"] == 50
    assert r["mean_diff"] == pytest.approx(0.01, abs=0.002)
    assert 0 < r["ci_low"] < r["mean_diff"] < r["ci_high"]
    assert r["p"] < 1e-6 and r["significant"] is True
    m = re.fullmatch(r"v8 beats v6 by (0\.\d+) Dice \(95% CI (0\.\d+) to (0\.\d+), p < 0\.0001\)", r["sentence"])
    assert m, r["sentence"]
    assert float(m.group(1)) == pytest.approx(r["mean_diff"], abs=1e-4)
    assert float(m.group(2)) <= float(m.group(1)) <= float(m.group(3))
    # Swapping the sides flips the difference, not the verdict.
    flipped = paired_compare(b, a, name_a="v8", name_b="v6")
    assert flipped["mean_diff"] == pytest.approx(-r["mean_diff"])
    assert flipped["sentence"] == r["sentence"]


def test_lower_is_better_for_components_error():
    assert "components_error" in LOWER_IS_BETTER
    a = results(30, seed=0)
    b = results(30, seed=2, shift=-0.05, noise=0.01, base=a)  # B has fewer component errors
    r = paired_compare(a, b, metric="components_error")
    assert r["mean_diff"] < 0 and r["significant"]
    assert re.match(r"B beats A by 0\.05\d* components error \(lower is better; 95% CI", r["sentence"]), r["sentence"]
    assert "components error" in r["sentence"]


def test_small_noisy_difference_is_not_detectable_and_n_needed_follows_formula():
    a = results(10, seed=0)
    b = results(10, seed=3, shift=0.0002, noise=0.002, base=a)
    r = paired_compare(a, b, metric="iou")
    assert r["significant"] is False
    d = np.array([b[k] - a[k] for k in sorted(a)])
    z = 1.959963984540054 + 0.8416212335729143
    expected = math.ceil((z * d.std(ddof=1) / abs(d.mean())) ** 2)
    assert r["n_needed"] == max(expected, 6)
    assert r["n_needed"] > 10
    assert r["sentence"].startswith("no detectable difference in IoU on 10 images (mean difference B - A")
    assert f"about {r['n_needed']} images would be needed" in r["sentence"]


def test_tiny_samples_do_not_crash():
    r = paired_compare({"x": 0.5}, {"x": 0.6})
    assert r["n"] == 1 and r["p"] == 1.0 and not r["significant"] and r["n_needed"] is None
    r = paired_compare({"x": 0.5, "y": 0.4}, {"x": 0.6, "y": 0.45})
    assert r["p"] == pytest.approx(0.5) and not r["significant"]
    assert r["n_needed"] >= 6  # the signed-rank test cannot reach p < 0.05 on fewer pairs


def test_mismatched_image_sets_are_refused_naming_ids():
    a = {"a1": 0.8, "a2": 0.8, "both": 0.8}
    b = {"b1": 0.8, "both": 0.8}
    with pytest.raises(UserError) as err:
        paired_compare(a, b, name_a="base", name_b="new")
    msg = str(err.value)
    assert "2 only in base (a1, a2)" in msg and "1 only in new (b1)" in msg and "1 in both" in msg
    many = {f"x{i}": 0.5 for i in range(12)}
    with pytest.raises(UserError, match=r"\(7 more\)"):
        paired_compare(many, {})


def test_paired_bootstrap_is_deterministic():
    a = results(20, seed=0)
    b = results(20, seed=4, shift=0.001, noise=0.01, base=a)
    assert paired_compare(a, b, seed=7) == paired_compare(a, b, seed=7)
