"""evaluate.py end to end on the tiny checkpoint: outputs, both paths, --compare, bad input, torchrun."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_ok
from sa2va.evaluation import COLOUR_FN, COLOUR_FP, COLOUR_TP, mask_dice, overlay, predict_forward_needs_cuda
from sa2va.metrics import METRICS

N_IMAGES = 6
EVAL = [sys.executable, "evaluate.py"]


def run_fail(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0, f"{' '.join(cmd)} should have failed\n{proc.stdout}\n{proc.stderr}"
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error: no traceback, a single `error:` line on stderr."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from sa2va.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("eval") / "vessels", n=N_IMAGES, size=256, seed=0)


@pytest.fixture(scope="module")
def names(data) -> list[str]:
    return sorted(p.stem for p in (data / "images").glob("*.png"))


@pytest.fixture(scope="module")
def forward_run(tiny_model, data, tmp_path_factory) -> Path:
    # Batch size 1: sharding then cannot change what any image is computed with, so the torchrun test
    # can demand byte-identical files. (Batches of other sizes change float rounding at the 1e-7
    # level, and the tiny model's probabilities all sit within 0.003 of the threshold.)
    out = tmp_path_factory.mktemp("eval") / "forward"
    run_ok(EVAL + ["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--trust-remote-code",
                   "--save-masks", "--overlays", "2", "--batch-size", "1"])
    return out


def copy_data(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


# --------------------------------------------------------------------------- forward path


def test_forward_writes_every_output(forward_run, names):
    results = json.loads((forward_run / "results.json").read_text())
    assert results["path"] == "forward" and results["headline"] == "forward" and results["n"] == N_IMAGES
    for m in METRICS:
        s = results["metrics"][m]
        assert s["ci_low"] <= s["mean"] <= s["ci_high"] and s["n"] == N_IMAGES
        assert set(s) >= {"mean", "median", "std", "ci_low", "ci_high", "pooled"}
    assert results["metrics"]["components_error"]["pooled"] is None
    assert sorted(results["per_image"]) == names
    assert all(set(row) == set(METRICS) for row in results["per_image"].values())
    assert results["speed"]["forward"] > 0

    header, rows = read_csv(forward_run / "per_image.csv")
    assert header[0] == "name" and set(METRICS) <= set(header)
    assert [r["name"] for r in rows] == names
    for r in rows:  # the CSV and the JSON hold the same numbers
        assert float(r["dice"]) == results["per_image"][r["name"]]["dice"]

    masks = sorted((forward_run / "masks").iterdir())
    assert [p.name for p in masks] == [f"{n}.png" for n in names]
    with Image.open(masks[0]) as m:
        assert m.mode == "L" and m.size == (256, 256) and set(np.unique(np.asarray(m))) <= {0, 255}
    overlays = sorted(p.name for p in (forward_run / "overlays").iterdir())
    assert overlays == [f"{n}.png" for n in names[:2]]
    assert not any(p.name.startswith(".") for p in forward_run.iterdir())  # no temporary leftovers


def test_holdout_json_restricts_the_images(tiny_model, data, names, tmp_path):
    held = copy_data(data, tmp_path / "held")
    (held / "holdout.json").write_text(json.dumps({"ids": [names[4], names[1]]}))
    out = tmp_path / "out"
    stdout = run_ok(EVAL + ["--model", str(tiny_model), "--data", str(held), "--out", str(out),
                            "--trust-remote-code"])
    assert "holdout.json" in stdout and "2 held-out images" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 2 and sorted(results["per_image"]) == [names[1], names[4]]
    _, rows = read_csv(out / "per_image.csv")
    assert [r["name"] for r in rows] == [names[1], names[4]]


# --------------------------------------------------------------------------- both paths


def test_both_paths_agree_and_generate_seg(tiny_model, data, names, tmp_path):
    out = tmp_path / "both"
    run_ok(EVAL + ["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--trust-remote-code",
                   "--path", "both", "--save-masks"])
    results = json.loads((out / "results.json").read_text())
    agreement = results["agreement"]
    # Same weights, same prompt, same math: the training forward and predict_forward give one mask.
    assert agreement["mean_dice"] >= 0.99, agreement
    assert agreement["fraction_with_seg"] == 1.0
    assert all("[SEG]" in row["text"] for row in agreement["per_image"].values())
    assert set(results["paths"]) == {"forward", "generate"}
    assert results["metrics"] == results["paths"]["forward"]["metrics"]  # forward is the headline
    assert all(v > 0 for v in results["speed"].values())
    header, rows = read_csv(out / "per_image.csv")
    assert {"dice", "generate_dice", "agreement_dice", "has_seg", "text"} <= set(header)
    assert all(r["has_seg"] == "1" for r in rows)
    assert sorted(p.name for p in (out / "masks_generate").iterdir()) == [f"{n}.png" for n in names]


# --------------------------------------------------------------------------- compare


def test_compare_with_itself_finds_no_difference(forward_run, tmp_path):
    target = tmp_path / "cmp.json"
    file = str(forward_run / "results.json")
    stdout = run_ok(EVAL + ["--compare", file, file, "--json", str(target), "--metrics", "dice,cldice"])
    doc = json.loads(target.read_text())
    assert set(doc["metrics"]) == {"dice", "cldice"} and doc["n"] == N_IMAGES
    for c in doc["metrics"].values():
        assert c["mean_diff"] == 0.0 and c["ci_low"] == 0.0 and c["ci_high"] == 0.0
        assert c["p"] == 1.0 and not c["significant"]
        assert c["sentence"].startswith("no ") and "difference" in c["sentence"]
        assert c["sentence"] in " ".join(stdout.split())


def test_compare_refuses_different_image_sets(forward_run, names, tmp_path):
    other = json.loads((forward_run / "results.json").read_text())
    other["per_image"]["extra_image"] = other["per_image"].pop(names[2])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps(other))
    proc = run_fail(EVAL + ["--compare", str(forward_run / "results.json"), str(tmp_path / "other" / "results.json"),
                            "--json", str(tmp_path / "cmp.json")])
    line = error_line(proc)
    assert names[2] in line and "extra_image" in line
    assert not (tmp_path / "cmp.json").exists()


# --------------------------------------------------------------------------- bad input


def test_corrupt_image_is_named_and_leaves_results_alone(tiny_model, data, names, tmp_path):
    bad = copy_data(data, tmp_path / "bad")
    (bad / "images" / f"{names[3]}.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("previous run\n")  # a complete earlier result must survive
    proc = run_fail(EVAL + ["--model", str(tiny_model), "--data", str(bad), "--out", str(out),
                            "--trust-remote-code"])
    assert f"{names[3]}.png" in error_line(proc)
    assert (out / "results.json").read_text() == "previous run\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_wrong_size_mask_is_named_with_both_sizes(tiny_model, data, names, tmp_path):
    bad = copy_data(data, tmp_path / "bad")
    Image.new("L", (100, 80)).save(bad / "masks" / f"{names[0]}.png")
    out = tmp_path / "out"
    proc = run_fail(EVAL + ["--model", str(tiny_model), "--data", str(bad), "--out", str(out),
                            "--trust-remote-code"])
    line = error_line(proc)
    assert f"masks/{names[0]}.png" in line and "100x80" in line and "256x256" in line
    assert not (out / "results.json").exists()


def test_unreadable_model_folder(data, tmp_path):
    (tmp_path / "model").mkdir()
    proc = run_fail(EVAL + ["--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "o")])
    assert "config.json" in error_line(proc)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- torchrun


def test_two_process_torchrun_gives_the_same_numbers(tiny_model, data, forward_run, tmp_path):
    out = tmp_path / "dist"
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
            "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--trust-remote-code",
            "--save-masks", "--batch-size", "1"])
    assert (out / "per_image.csv").read_text() == (forward_run / "per_image.csv").read_text()
    one = json.loads((forward_run / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    assert two["world_size"] == 2 and two["metrics"] == one["metrics"] and two["per_image"] == one["per_image"]
    for mask in (forward_run / "masks").iterdir():
        assert (out / "masks" / mask.name).read_bytes() == mask.read_bytes()


# --------------------------------------------------------------------------- helpers (in-process)


def test_overlay_colours_and_agreement_dice():
    image = np.full((2, 3, 3), 200, np.uint8)
    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    gt = np.array([[1, 0, 1], [0, 0, 0]], bool)
    fov = np.array([[1, 1, 1], [1, 1, 0]], bool)
    out = overlay(image, pred, gt, fov)
    assert tuple(out[0, 0]) == COLOUR_TP and tuple(out[0, 1]) == COLOUR_FP and tuple(out[0, 2]) == COLOUR_FN
    assert out[1, 0, 0] < 200 and out[1, 2, 0] < out[1, 0, 0]  # darkened; darker still outside the FOV
    assert mask_dice(pred, gt) == 0.5
    assert mask_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_cuda_only_predict_forward_is_detected(tiny_model, tmp_path):
    assert not predict_forward_needs_cuda(tiny_model)
    release = tmp_path / "release"
    shutil.copytree(tiny_model, release)
    code = release / "modeling_sa2va_chat.py"
    code.write_text(code.read_text().replace("input_ids = torch.tensor(ids, device=device)[None]",
                                             "input_ids = torch.tensor(ids).cuda()[None]"))
    assert predict_forward_needs_cuda(release)
