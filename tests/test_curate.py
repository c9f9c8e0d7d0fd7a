"""curate_data.py: the gap rule, the sources, the split, and that inputs are never touched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sa2va.curation import (
    Options,
    break_vessels,
    curate,
    dice,
    drop_thin,
    erode,
    gap,
    judge,
    perturb,
    read_holdout_ids,
    select_max,
    split_holdout,
)
from sa2va.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SIZE = 48


# ----------------------------------------------------------------------------- fixtures


def vessel_mask(index: int, size: int = SIZE) -> np.ndarray:
    """A 1-px diagonal capillary, a 1-px horizontal one and a 7-px thick trunk."""
    m = np.zeros((size, size), bool)
    idx = np.arange(5, size - 5)
    m[idx, (idx + index) % size] = True  # 8-connected diagonal, 1 px wide
    m[8 + index % 5, 4:size - 4] = True  # horizontal, 1 px
    m[size // 2 - 3:size // 2 + 4, 6:size - 6] = True  # trunk, 7 px
    return m


def save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def save_image(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def make_dataset(root: Path, n: int = 6, rejected: bool = False) -> Path:
    for i in range(n):
        name = f"img{i:02d}"
        save_image(root / "images" / f"{name}.png", i)
        gt = vessel_mask(i)
        save_mask(root / "masks" / f"{name}.png", gt)
        if rejected:
            save_mask(root / "rejected_masks" / f"{name}.png", erode(gt))
    return root


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "curate_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def load_pairs(folder: Path) -> list[dict]:
    return json.loads((folder / "dpo_annotations.json").read_text())


# ----------------------------------------------------------------------------- pure pieces


def test_dice_and_gap_conventions():
    a = np.zeros((4, 4), bool)
    assert dice(a, a) == 1.0 and gap(a, a) == 0.0
    b = a.copy()
    b[0, 0] = True
    assert dice(a, b) == 0.0 and gap(b, a) == 1.0
    gt = vessel_mask(0)
    rej = erode(gt)
    assert gap(rej, gt) == pytest.approx(1 - dice(rej, gt), abs=1e-12)


def _masks_with_gap(total_each: int, moved: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """chosen with `total_each` pixels; rejected = chosen with `moved` pixels moved elsewhere."""
    chosen = np.zeros(size * size, bool)
    chosen[:total_each] = True
    rejected = chosen.copy()
    rejected[:moved] = False
    rejected[total_each:total_each + moved] = True
    return chosen.reshape(size, size), rejected.reshape(size, size)


def test_gap_rule_boundary():
    chosen, at = _masks_with_gap(20, 3)  # xor 6 / 40 = 0.15 exactly
    assert gap(at, chosen) == 0.15
    chosen2, below = _masks_with_gap(2000, 299)  # 598 / 4000 = 0.1495
    assert gap(below, chosen2) < 0.15
    opts = Options(min_gap=0.15)
    assert judge("a", chosen, [("given", "given", at)], opts)[0][0].status == "kept"
    assert judge("b", chosen2, [("given", "given", below)], opts)[0][0].status == "gap_below_min"
    assert judge("c", chosen, [("given", "given", at)], Options(min_gap=0.0, max_gap=0.14))[0][0].status \
        == "gap_above_max"


def test_judge_deduplicates_and_drops_copies_of_chosen():
    gt = vessel_mask(1)
    e = erode(gt)
    judged = judge("x", gt, [("given", "given", e), ("erode", "perturb", e.copy()), ("same", "perturb", gt.copy()),
                             ("dilate", "perturb", ~gt)], Options(min_gap=0.0))
    assert [c.status for c, _ in judged] == ["kept", "duplicate", "identical_to_chosen", "kept"]
    assert judged[1][0].duplicate_of == "given"


def test_erosion_drops_one_pixel_vessels():
    gt = vessel_mask(2)
    thin_only = gt.copy()
    thin_only[SIZE // 2 - 3:SIZE // 2 + 4, :] = False  # what is left are the 1-px capillaries
    eroded = erode(gt)
    assert not (eroded & thin_only).any()  # every 1-px vessel pixel is gone
    assert eroded[SIZE // 2 - 2:SIZE // 2 + 3, 10:SIZE - 10].all()  # the trunk keeps its core
    thinned = drop_thin(gt)
    far_from_trunk = thin_only.copy()
    far_from_trunk[SIZE // 2 - 4:SIZE // 2 + 5, :] = False  # a capillary touching the trunk keeps 1 px
    assert not (thinned & far_from_trunk).any()
    trunk = np.zeros_like(gt)
    trunk[SIZE // 2 - 3:SIZE // 2 + 4, 6:SIZE - 6] = True
    # drop_thin keeps the trunk at its true outline (away from where capillaries cross it)
    assert thinned[SIZE // 2 - 3:SIZE // 2 + 4, 12:SIZE - 12].all()
    assert not (thinned & ~gt).any()


def test_break_is_seeded_and_cuts_vessels():
    gt = vessel_mask(3)
    a = perturb(gt, "break", 1, seed=0, image_id="x")
    b = perturb(gt, "break", 1, seed=0, image_id="x")
    c = perturb(gt, "break", 1, seed=1, image_id="x")
    d = perturb(gt, "break", 2, seed=0, image_id="x")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert not (a & ~gt).any() and a.sum() < gt.sum()
    from scipy import ndimage
    assert ndimage.label(a, np.ones((3, 3)))[1] > ndimage.label(gt, np.ones((3, 3)))[1]  # broken apart
    assert np.array_equal(break_vessels(np.zeros((8, 8), bool), np.random.default_rng(0)), np.zeros((8, 8), bool))


def test_split_and_selection_are_deterministic():
    ids = [f"id{i}" for i in range(50)]
    h = split_holdout(ids, 0.2, seed=3)
    assert len(h) == 10 and h == split_holdout(list(reversed(ids)), 0.2, seed=3)
    assert h != split_holdout(ids, 0.2, seed=4)
    assert split_holdout(ids, 0.0, 0) == [] and len(split_holdout(ids, 1.0, 0)) == 50
    keys = [f"k{i}" for i in range(30)]
    s = select_max(keys, 7, seed=1)
    assert len(s) == 7 and s == select_max(keys[::-1], 7, seed=1)
    assert select_max(keys, None, 0) == set(keys)


def test_read_holdout_ids_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"ids": ["x", "y"], "images": ["images/x.png", "images/y.png"]}))
    (tmp_path / "b.json").write_text(json.dumps(["images/x.png", "y.v2"]))
    (tmp_path / "c.txt").write_text("# held out\nx\ny\n")
    assert read_holdout_ids(tmp_path / "a.json") == ["x", "y"]
    assert read_holdout_ids(tmp_path / "b.json") == ["x", "y.v2"]
    assert read_holdout_ids(tmp_path / "c.txt") == ["x", "y"]
    with pytest.raises(UserError, match="not found"):
        read_holdout_ids(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- the CLI


def test_given_source_chosen_is_gt_and_boundary_end_to_end(tmp_path):
    data = tmp_path / "d"
    chosen, at = _masks_with_gap(20, 3)
    chosen2, below = _masks_with_gap(2000, 299)
    for name, gt, rej in (("at", chosen, at), ("below", chosen2, below)):
        save_image(data / "images" / f"{name}.png", 0, (64, 64))
        save_mask(data / "masks" / f"{name}.png", gt)
        save_mask(data / "rejected_masks" / f"{name}.png", rej)
    before = tree_hash(data)
    out = cli("--data", str(data), "--min-gap", "0.15")
    assert out.returncode == 0, out.stderr
    assert "rejected sources: given" in out.stdout
    pairs = load_pairs(data)
    assert [(p["image"], p["chosen_mask"], p["rejected_mask"], p["source"]) for p in pairs] == [
        ("images/at.png", "masks/at.png", "rejected_masks/at.png", "given")]
    assert pairs[0]["gap"] == 0.15
    report = json.loads((data / "curation_report.json").read_text())
    assert report["images"]["below"]["given"]["status"] == "gap_below_min"
    assert report["counts"]["pairs"] == 1 and report["min_gap"] == 0.15
    assert report["arguments"]["min_gap"] == 0.15
    assert not (data / "curated_rejected").exists()
    after = tree_hash(data)
    assert {k: v for k, v in after.items() if k in before} == before  # inputs untouched
    assert set(after) - set(before) == {"dpo_annotations.json", "curation_report.json", "holdout.json"}


def test_perturb_to_other_folder_is_self_contained_and_deterministic(tmp_path):
    data = make_dataset(tmp_path / "d", n=6)
    before = tree_hash(data)
    args = ["--data", str(data), "--min-gap", "0.05", "--rejected", "perturb", "--holdout", "0.34",
            "--perturbations", "erode,dilate,break,drop_thin", "--seed", "7"]
    r1 = cli(*args, "--out", str(tmp_path / "o1"))
    r2 = cli(*args, "--out", str(tmp_path / "o2"))
    r3 = cli(*args[:-1], "8", "--out", str(tmp_path / "o3"))
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr
    assert tree_hash(data) == before
    h1, h2, h3 = (tree_hash(tmp_path / o) for o in ("o1", "o2", "o3"))
    h1 = {k: v for k, v in h1.items() if k != "curation_report.json"}  # it records --out
    h2 = {k: v for k, v in h2.items() if k != "curation_report.json"}
    assert h1 == h2
    # erode is plain morphology (the same for every seed); break is drawn from the seed
    erode_common = [k for k in h1 if "__erode." in k and k in h3]
    break_common = [k for k in h1 if "__break." in k and k in h3]
    assert erode_common and break_common
    assert all(h1[k] == h3[k] for k in erode_common)
    assert all(h1[k] != h3[k] for k in break_common)

    o1 = tmp_path / "o1"
    pairs = load_pairs(o1)
    held = json.loads((o1 / "holdout.json").read_text())
    assert len(held["ids"]) == 2 and held["images"] == [f"images/{i}.png" for i in held["ids"]]
    report = json.loads((o1 / "curation_report.json").read_text())
    assert report["holdout"]["ids"] == held["ids"]
    used = {p["image"].split("/")[1].split(".")[0] for p in pairs}
    assert used and not used & set(held["ids"])
    assert not set(report["images"]) & set(held["ids"])
    for p in pairs:
        name = Path(p["image"]).stem
        assert p["chosen_mask"] == f"masks/{name}.png"
        for key in ("image", "chosen_mask", "rejected_mask"):
            assert (o1 / p[key]).is_file()
        assert (o1 / p["chosen_mask"]).read_bytes() == (data / "masks" / f"{name}.png").read_bytes()
        assert p["source"].startswith("perturb:")
    for i in held["ids"]:  # held-out images are there for evaluation
        assert (o1 / "images" / f"{i}.png").is_file() and (o1 / "masks" / f"{i}.png").is_file()
    # the training data loader accepts the folder
    from sa2va.data import read_pairs
    assert len(read_pairs(o1)) == len(pairs)


def test_holdout_ids_file_and_max_samples(tmp_path):
    data = make_dataset(tmp_path / "d", n=6)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("img01\nimg04\n")
    args = ["--data", str(data), "--min-gap", "0.05", "--rejected", "perturb", "--holdout-ids", str(ids_file),
            "--max-samples", "5", "--seed", "3"]
    r = cli(*args, "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    pairs = load_pairs(tmp_path / "o")
    assert len(pairs) == 5
    assert not {Path(p["image"]).stem for p in pairs} & {"img01", "img04"}
    assert json.loads((tmp_path / "o" / "holdout.json").read_text())["ids"] == ["img01", "img04"]
    report = json.loads((tmp_path / "o" / "curation_report.json").read_text())
    assert report["counts"]["max_samples"] > 0 and report["counts"]["pairs"] == 5
    assert len(list((tmp_path / "o" / "curated_rejected").iterdir())) == 5
    r = cli(*args, "--out", str(tmp_path / "o2"))
    assert [p["id"] for p in load_pairs(tmp_path / "o2")] == [p["id"] for p in pairs]
    bad = tmp_path / "bad.txt"
    bad.write_text("nope\n")
    r = cli("--data", str(data), "--min-gap", "0.05", "--rejected", "perturb", "--holdout-ids", str(bad))
    assert r.returncode != 0 and "nope" in r.stderr


def test_dry_run_writes_nothing(tmp_path):
    data = make_dataset(tmp_path / "d", n=3, rejected=True)
    before = tree_hash(tmp_path)
    r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "given,perturb", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing written" in r.stdout and "gap histogram" in r.stdout
    r = cli("--data", str(data), "--min-gap", "0.1", "--dry-run", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert tree_hash(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and not list(data.glob(".*"))


def test_existing_annotations_refused_without_overwrite(tmp_path):
    data = make_dataset(tmp_path / "d", n=3)
    (data / "dpo_annotations.json").write_text("[]\n")
    args = ["--data", str(data), "--min-gap", "0.1", "--rejected", "perturb"]
    r = cli(*args)
    assert r.returncode != 0 and "dpo_annotations.json already exists" in r.stderr and "--overwrite" in r.stderr
    assert (data / "dpo_annotations.json").read_text() == "[]\n"
    r = cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    first = load_pairs(data)
    assert first and all((data / p["rejected_mask"]).is_file() for p in first)
    # a second run with fewer sources replaces the curated folder: no stale files remain
    r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "perturb", "--perturbations", "erode",
            "--overwrite")
    assert r.returncode == 0, r.stderr
    second = load_pairs(data)
    assert {p["rejected_mask"] for p in second} == {f"curated_rejected/{f.name}"
                                                     for f in (data / "curated_rejected").iterdir()}


def test_out_must_not_overwrite_inputs(tmp_path):
    data = make_dataset(tmp_path / "d", n=2)
    before = tree_hash(tmp_path)
    for out, msg in ((data / "images", "inside the input folder"), (data / "masks" / "x", "inside the input folder"),
                     (tmp_path, "holds the data folder")):
        r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "perturb", "--out", str(out), "--overwrite")
        assert r.returncode != 0 and msg in r.stderr, (out, r.stderr)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "perturb", "--out", str(other), "--overwrite")
    assert r.returncode != 0 and "not an earlier curate_data.py output" in r.stderr
    (other / "keep.txt").unlink()
    other.rmdir()
    assert tree_hash(tmp_path) == before


BAD_CASES = {
    "missing_mask": ("masks/img01.png", "has no mask"),
    "unreadable_image": ("images/img01.png", "cannot read image"),
    "size_mismatch": ("masks/img01.png", "is 40x48 (WxH) but its image"),
    "non_binary_mask": ("masks/img01.png", "is not binary"),
    "colour_mask": ("masks/img01.png", "colour image"),
    "empty_gt": ("masks/img01.png", "is empty"),
    "leaves_dir": ("images/img01.png", "leaves the data folder"),
    "bad_given_rejected": ("rejected_masks/img01.png", "is not binary"),
    "two_images_one_name": ("images/img01", "two images share the name"),
}


def break_input(data: Path, case: str, outside: Path) -> None:
    if case == "missing_mask":
        (data / "masks" / "img01.png").unlink()
    elif case == "unreadable_image":
        (data / "images" / "img01.png").write_bytes(b"\x89PNG not really")
    elif case == "size_mismatch":
        save_mask(data / "masks" / "img01.png", vessel_mask(1)[:, :40])
    elif case == "non_binary_mask":
        grey = np.where(vessel_mask(1), 255, 0).astype(np.uint8)
        grey[0, 0] = 128
        Image.fromarray(grey).save(data / "masks" / "img01.png")
    elif case == "colour_mask":
        rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
        rgb[vessel_mask(1)] = (255, 0, 0)
        Image.fromarray(rgb).save(data / "masks" / "img01.png")
    elif case == "empty_gt":
        save_mask(data / "masks" / "img01.png", np.zeros((SIZE, SIZE), bool))
    elif case == "leaves_dir":
        save_image(outside / "elsewhere.png", 5)
        (data / "images" / "img01.png").unlink()
        os.symlink(outside / "elsewhere.png", data / "images" / "img01.png")
    elif case == "bad_given_rejected":
        grey = np.full((SIZE, SIZE), 7, np.uint8)
        grey[0, 0] = 9
        Image.fromarray(grey).save(data / "rejected_masks" / "img01.png")
    elif case == "two_images_one_name":
        save_image(data / "images" / "img01.jpg", 3)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_named_and_nothing_written(tmp_path, case):
    data = make_dataset(tmp_path / "d", n=3, rejected=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    break_input(data, case, outside)
    before = tree_hash(tmp_path)
    r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "given,perturb")
    file, msg = BAD_CASES[case]
    assert r.returncode != 0
    assert file in r.stderr and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert tree_hash(tmp_path) == before and not list(data.glob(".*"))

    r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "given,perturb", "--skip-bad")
    assert r.returncode == 0, r.stderr
    report = json.loads((data / "curation_report.json").read_text())
    assert [s["id"] for s in report["skipped"]] == ["img01"]
    assert file in report["skipped"][0]["file"] and msg in report["skipped"][0]["reason"]
    assert "skipped" in r.stdout and "img01" in r.stdout
    assert "img01" not in {Path(p["image"]).stem for p in load_pairs(data)}


def test_missing_folders_and_sources(tmp_path):
    r = cli("--data", str(tmp_path / "nope"), "--min-gap", "0.1", "--rejected", "perturb")
    assert r.returncode != 0 and "does not exist" in r.stderr
    (tmp_path / "d" / "images").mkdir(parents=True)
    r = cli("--data", str(tmp_path / "d"), "--min-gap", "0.1", "--rejected", "perturb")
    assert r.returncode != 0 and "no masks/ folder" in r.stderr
    data = make_dataset(tmp_path / "e", n=2)
    r = cli("--data", str(data), "--min-gap", "0.1")
    assert r.returncode != 0 and "rejected_masks does not exist and no --model" in r.stderr
    assert "models/sa2va_vessel_hf" in r.stderr and "--rejected perturb" in r.stderr
    r = cli("--data", str(data), "--min-gap", "0.1", "--rejected", "model")
    assert r.returncode != 0 and "needs --model" in r.stderr
    r = cli("--data", str(data), "--min-gap", "1.5", "--rejected", "perturb")
    assert r.returncode != 0 and "--min-gap must be in [0, 1]" in r.stderr
    r = cli("--data", str(data), "--min-gap", "1.0", "--rejected", "perturb", "--perturbations", "dilate")
    assert r.returncode != 0 and "no pair passed the gap rule" in r.stderr
    assert not (data / "dpo_annotations.json").exists() and not list(data.glob(".*"))


def test_no_data_argument_names_the_default(tmp_path):
    r = cli("--min-gap", "0.15", cwd=tmp_path)
    assert r.returncode != 0
    assert ("no data folder given and data/vessels (data.root of configs/v8.yaml) does not exist: pass --data DIR"
            in r.stderr)
    assert "python -m sa2va.synth --out DIR --n 200" in r.stderr
    make_dataset(tmp_path / "data" / "vessels", n=2)
    r = cli("--min-gap", "0.1", "--rejected", "perturb", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "using data.root of configs/v8.yaml: data/vessels" in r.stdout


def test_model_source_with_a_fake_predictor(tmp_path):
    data = make_dataset(tmp_path / "d", n=4)
    calls = []

    def predictor(images):
        calls.append(len(images))
        out = []
        for k, img in enumerate(images):
            prob = np.full(img.shape[:2], 0.4, np.float32)
            prob[: img.shape[0] // 2] = 0.6
            out.append(prob)
        return out

    opts = Options(min_gap=0.0, sources=("model",), thresholds=(0.3, 0.5, 0.7), holdout=0.25)
    stage = tmp_path / "stage"
    result = curate(data, opts, predictor=predictor, stage=stage, chunk=2)
    assert calls == [2, 1]  # one image held out; chunks of 2
    by_image: dict[str, list[str]] = {}
    for c in result.candidates:
        by_image.setdefault(c.image_id, []).append(f"{c.tag}:{c.status}")
    for tags in by_image.values():
        # 0.3 -> all foreground, 0.5 -> top half, 0.7 -> empty: three distinct masks
        assert [t.split(":")[0] for t in tags] == ["model_t0.30", "model_t0.50", "model_t0.70"]
    assert all((stage / c.rejected).is_file() for c in result.pairs)


# ----------------------------------------------------------------------------- the tiny checkpoint


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.mark.skipif(not (_have("sa2va.tiny") and _have("sa2va.model")), reason="sa2va.tiny / sa2va.model not there yet")
def test_model_source_with_the_tiny_checkpoint(tmp_path, tiny_model):
    from sa2va.synth import write_dataset

    model = tiny_model  # the session's tiny checkpoint (tests/conftest.py); only read here
    data = write_dataset(tmp_path / "d", 4, size=64, seed=0)
    r = cli("--data", str(data), "--min-gap", "0.0", "--model", str(model), "--trust-remote-code",
            "--device", "cpu", "--thresholds", "0.3,0.5,0.7", "--batch-size", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "o" / "curation_report.json").read_text())
    assert report["sources"] == ["model"]
    assert set(report["per_source"]) <= {"model_t0.30", "model_t0.50", "model_t0.70"}
    assert report["counts"]["candidates"] == 12
    for p in load_pairs(tmp_path / "o"):
        assert p["source"].startswith("model:t0.")
        assert Path(p["rejected_mask"]).parent.name == "curated_rejected"
        with Image.open(tmp_path / "o" / p["rejected_mask"]) as im:
            assert im.size == (64, 64)


def test_curation_without_a_model_never_imports_torch(tmp_path):
    """given/perturb sources and the config checks need no torch: the command starts at once."""
    data = make_dataset(tmp_path / "d", n=2)
    code = ("import sys, curate_data; rc = curate_data.main(['--data', sys.argv[1], '--min-gap', '0.05', "
            "'--rejected', 'perturb']); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(data)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 False"
    assert load_pairs(data)
