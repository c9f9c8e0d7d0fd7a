"""The main job's wiring, end to end at a miniature size (the baseline builder: test_baseline.py)."""

import json
import sys

from conftest import run_ok


def test_demo_runs_every_step_and_keeps_every_artefact(tiny_model, tmp_path):
    out = tmp_path / "demo"
    stdout = run_ok([sys.executable, "-m", "sa2va.demo", "--out", str(out), "--baseline", str(tiny_model),
                     "--n-train", "8", "--n-test", "4", "--size", "64", "max_steps=2", "train.eval_every=1",
                     "train.micro_batch_size=2"])
    for path in ("baseline/model.safetensors", "data/images", "pairs/dpo_annotations.json",
                 "pairs/curation_report.json", "pairs/holdout.json", "train/metrics.jsonl",
                 "train/final/model.safetensors", "eval/baseline/results.json", "eval/trained/results.json",
                 "compare.json", "plots/losses.png", "plots/dice.png"):
        assert (out / path).exists(), path
    held_out = json.loads((out / "pairs" / "holdout.json").read_text())["ids"]
    pairs = json.loads((out / "pairs" / "dpo_annotations.json").read_text())
    assert len(held_out) == 4 and not any(p["image"].split("/")[-1][:-4] in held_out for p in pairs)
    assert json.loads((out / "eval" / "trained" / "results.json").read_text())["n"] == 4
    assert "Everything is in" in stdout


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "x").write_text("keep me")
    import subprocess

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "sa2va.demo", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (tmp_path / "x").read_text() == "keep me"
