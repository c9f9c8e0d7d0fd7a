"""Reliability (issue 9): kill -9 and resume, damaged checkpoints, full or unwritable output
folders, non-finite steps, a destructive learning rate, and untrusted files.

The bad-input corpus is in test_reliability_inputs.py; the longer kill -9 soak whose counts
are in docs/reliability.md is experiments/fault_soak.py (these tests use its code).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_ok, trained_tensors

from sa2va import checkpoint as ckpt
from sa2va.errors import UserError

_spec = importlib.util.spec_from_file_location("fault_soak", REPO / "experiments" / "fault_soak.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules["fault_soak"] = soak
_spec.loader.exec_module(soak)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- 1. faults: kill -9


@pytest.fixture(scope="module")
def reference_1p(tiny_model, tiny_pairs, tmp_path_factory):
    """An uninterrupted 1-process run (save_every=1, 10 steps over 1.25 epochs) and its timeline."""
    out = tmp_path_factory.mktemp("ref1") / "run"
    timeline = soak.reference_run(1, tiny_model, tiny_pairs, out, soak.STEPS[1])
    return out, timeline


def test_kill9_at_random_moments_one_process_resumes_to_identical_weights(reference_1p, tiny_model, tiny_pairs,
                                                                            tmp_path):
    ref, timeline = reference_1p
    # Two kills in one run's life (killed, resumed, killed again, resumed to the end), from
    # outside, at seeded random moments of the training loop (steps, checkpoint writes, export).
    # The first is drawn once a checkpoint exists: a kill before it is a known problem
    # (test_kill_after_reference_logits_before_the_first_checkpoint) that must not make CI flaky.
    trial = soak.run_trial(1, 0, tiny_model, tiny_pairs, ref, tmp_path, timeline, random.Random(91), kills=2,
                           early=0.0, checkpointed=True)
    where = [(k.landed, k.newest_complete, k.resumed_from) for k in trial.kills]
    assert trial.resumed_correctly, where  # each resume took the newest complete checkpoint
    assert trial.metrics_steps_ok and trial.no_leftovers, where
    assert trial.identical and trial.identical_final, (where, trial.max_abs_diff)  # bit for bit on CPU


def test_kill9_at_a_random_moment_two_processes_resumes_to_identical_weights(tiny_model, tiny_pairs, tmp_path):
    ref = tmp_path / "ref2"
    timeline = soak.reference_run(2, tiny_model, tiny_pairs, ref, soak.STEPS[2])
    trial = soak.run_trial(2, 0, tiny_model, tiny_pairs, ref, tmp_path, timeline, random.Random(7), kills=1,
                           early=0.0, checkpointed=True)
    where = [(k.victim, k.landed, k.newest_complete, k.resumed_from) for k in trial.kills]
    assert trial.resumed_correctly and trial.metrics_steps_ok and trial.no_leftovers, where
    assert trial.identical and trial.identical_final, (where, trial.max_abs_diff)


def _copy_run(ref: Path, dst: Path) -> Path:
    shutil.copytree(ref, dst, symlinks=True)
    shutil.rmtree(dst / "final", ignore_errors=True)
    return dst


def test_partial_and_damaged_checkpoints_are_skipped_and_resume_falls_back(reference_1p, tiny_model, tiny_pairs,
                                                                             tmp_path):
    ref, _ = reference_1p
    run = _copy_run(ref, tmp_path / "run")
    cdir = run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000009", "step_0000010"]
    # The newest complete checkpoint got a torn trainer_state.json (disk trouble after the rename).
    state = cdir / "step_0000010" / "trainer_state.json"
    state.write_text(state.read_text()[:25])
    # A newer step folder without COMPLETE, and a temporary folder of a write that was killed.
    shutil.copytree(cdir / "step_0000009", cdir / "step_0000011")
    (cdir / "step_0000011" / "COMPLETE").unlink()
    shutil.copytree(cdir / "step_0000009", cdir / ".step_0000012.k3j2.tmp")
    assert ckpt.latest_checkpoint(run) == cdir / "step_0000009"

    cmd = soak.train_cmd(1, tiny_model, tiny_pairs, run, soak.STEPS[1], resume=True)
    log = run_ok(cmd, env=ENV)
    assert f"resumed from {cdir / 'step_0000009'} at step 9" in log
    a = trained_tensors(ref / "checkpoints" / "step_0000010")
    b = trained_tensors(cdir / "step_0000010")  # step 10 again, written over the torn one
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not (cdir / ".step_0000012.k3j2.tmp").exists()  # the killed write's leftovers are cleared
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_damaged_weight_files_are_skipped_and_a_swap_cut_short_is_repaired(reference_1p, tmp_path):
    ref, _ = reference_1p
    run = _copy_run(ref, tmp_path / "run")
    cdir = run / "checkpoints"
    newest, previous = cdir / "step_0000010", cdir / "step_0000009"
    weights = newest / "trained.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # truncated
    assert ckpt.latest_checkpoint(run) == previous
    weights.write_bytes(intact)
    state = (newest / "training_state.pt").read_bytes()
    (newest / "training_state.pt").write_bytes(state[:-100])  # torn: the zip index is at the end
    assert ckpt.latest_checkpoint(run) == previous
    (newest / "training_state.pt").write_bytes(state)
    assert ckpt.latest_checkpoint(run) == newest
    # Killed between atomic_dir's two renames while replacing `best`: only `.best.old` is left.
    shutil.copytree(newest, cdir / ".best.old")
    (cdir / ".step_0000011.x.tmp").mkdir()
    ckpt.remove_stale(cdir)
    assert (cdir / "best" / "COMPLETE").is_file() and not (cdir / ".best.old").exists()
    assert not (cdir / ".step_0000011.x.tmp").exists()


def test_kill_after_reference_logits_before_the_first_checkpoint(reference_1p, tiny_model, tiny_pairs, tmp_path):
    # The state a kill leaves between writing reference_logits.pt and the first checkpoint
    # (and, at worst, after step 1's metrics line was appended but before its checkpoint).
    ref, _ = reference_1p
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(ref / "reference_logits.pt", run / "reference_logits.pt")
    (run / "metrics.jsonl").write_text((ref / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    log = run_ok(soak.train_cmd(1, tiny_model, tiny_pairs, run, soak.STEPS[1], resume=True), env=ENV)
    assert "starting fresh" in log
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    identical, diff = soak.compare(ref / "checkpoints" / "step_0000010" / "trained.safetensors",
                                   run / "checkpoints" / "step_0000010" / "trained.safetensors")
    assert identical, f"max |diff| {diff}"
    assert steps == list(range(1, 11))


def test_a_new_run_into_a_used_output_folder_is_refused(reference_1p, tiny_model, tiny_pairs, tmp_path):
    ref, _ = reference_1p
    run = _copy_run(ref, tmp_path / "run")
    proc = subprocess.run(soak.train_cmd(1, tiny_model, tiny_pairs, run, 1), cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert "--resume" in one_error_line(proc)


def test_unwritable_output_folder_is_reported_before_the_model_loads(tiny_pairs, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder should be\n")
    # model.path does not exist: the output problem must be reported before the model is looked at.
    cmd = [sys.executable, "train_dpo.py", "--cfg", "tiny", f"model.path={tmp_path / 'no_model'}",
           f"data.root={tiny_pairs}", f"output_dir={blocker / 'out'}"]
    line = one_error_line(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True))
    assert "is not writable: Not a directory" in line and str(blocker) in line


def _full_disk():
    # Every write of a byte fails with EFBIG, as on a full disk (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


@pytest.mark.parametrize("command", ["train", "evaluate", "curate"])
def test_full_disk_is_reported_before_any_work(command, tiny_model, tiny_pairs, tmp_path):
    out = tmp_path / "out"
    if command == "train":
        cmd = ["train_dpo.py", "--cfg", "tiny", f"model.path={tmp_path / 'no_model'}", f"data.root={tiny_pairs}",
               f"output_dir={out}"]
    elif command == "evaluate":
        cmd = ["evaluate.py", "--model", str(tiny_model), "--data", str(tiny_pairs), "--out", str(out),
               "--trust-remote-code", "--device", "cpu"]
    else:
        cmd = ["curate_data.py", "--data", str(tiny_pairs), "--min-gap", "0.1", "--rejected", "perturb",
               "--out", str(out)]
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True,
                          preexec_fn=_full_disk)
    line = one_error_line(proc)
    assert "File too large" in line, line
    assert "loading" not in proc.stdout  # evaluate says "loading MODEL ..." when it starts loading
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not left, left


def test_unwritable_output_folder_two_processes(tiny_pairs, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x\n")
    cmd = soak.train_cmd(2, tmp_path / "no_model", tiny_pairs, blocker / "out", 2)
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # torchrun adds its own failure report; rank 0's line is there, and no rank got to the model.
    assert f"error: output folder {blocker / 'out'} is not writable: Not a directory" in proc.stderr
    assert "model folder" not in proc.stderr


# --------------------------------------------------------------------------- 2. numerics


def _train_in_process(argv: list[str]) -> None:
    import train_dpo

    train_dpo.main(["--cfg", "tiny", *argv])


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_model, tiny_pairs, tmp_path, monkeypatch):
    import train_dpo

    original = train_dpo.combined_loss
    calls = {"n": 0}

    def faulty(cfg, logits, chosen, rejected, ref, generator=None):
        # One pair per step: call n is step n. Step 2: NaN gradient with a finite loss;
        # steps 4, 5, 6: NaN loss. max_bad_steps=3 stops the run at step 6.
        calls["n"] += 1
        loss, parts = original(cfg, logits, chosen, rejected, ref, generator)
        if calls["n"] == 2:
            logits.register_hook(lambda g: torch.full_like(g, float("nan")))
        if calls["n"] >= 4:
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(train_dpo, "combined_loss", faulty)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="stopped at step 6: 3 non-finite steps in a row"):
        _train_in_process([f"model.path={tiny_model}", f"data.root={tiny_pairs}", f"output_dir={out}",
                           "train.micro_batch_size=1", "train.grad_accum=1", "max_steps=8", "train.save_every=1",
                           "train.keep_checkpoints=10", "train.max_bad_steps=3", "lora.dropout=0.0"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]
    assert [math.isnan(r["grad_norm"]) for r in records] == [False, True, False, True, True]
    w = {s: trained_tensors(out / "checkpoints" / f"step_{s:07d}") for s in range(1, 6)}
    same = lambda a, b: all(np.array_equal(w[a][k], w[b][k]) for k in w[a])  # noqa: E731
    assert same(1, 2) and not same(2, 3) and same(3, 4) and same(3, 5)  # skipped steps changed nothing
    assert all(np.isfinite(v).all() for v in w[5].values())
    last = ckpt.latest_checkpoint(out)
    assert last.name == "step_0000005" and json.loads((last / "trainer_state.json").read_text())["skipped_steps"] == 3
    assert not (out / "final").exists()


def test_destructive_lr_shows_as_falling_held_out_dice_and_the_best_checkpoint_is_kept(tiny_model, tiny_pairs,
                                                                                       tmp_path):
    out = tmp_path / "run"
    _train_in_process([f"model.path={tiny_model}", f"data.root={tiny_pairs}", f"output_dir={out}",
                       f"data.val_root={tiny_pairs}", "train.eval_every=1", "optim.lr=0.03", "optim.warmup_ratio=0",
                       "train.micro_batch_size=1", "train.grad_accum=1", "max_steps=5", "train.save_every=1",
                       "train.keep_checkpoints=10"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0  # the starting model's held-out Dice, measured before step 1
    start = records[0]["val_dice"]
    dice = [r["val_dice"] for r in records[1:]]
    assert len(dice) == 5 and all(np.isfinite(dice))
    best_step = int(np.argmax(dice)) + 1
    assert best_step < 5 and dice[-1] < max(dice) - 0.05, dice  # the learning rate destroyed what it had
    assert max(dice) > start, (start, dice)  # (this run's first steps do improve on the start)
    best = out / "checkpoints" / "best"
    meta = json.loads((best / "trainer_state.json").read_text())
    assert meta["step"] == best_step and meta["best_dice"] == pytest.approx(max(dice))
    kept = trained_tensors(best)
    at_best = trained_tensors(out / "checkpoints" / f"step_{best_step:07d}")
    last = trained_tensors(out / "checkpoints" / "step_0000005")
    assert all(np.array_equal(kept[k], at_best[k]) for k in kept)  # best = the weights of its step
    assert not all(np.array_equal(kept[k], last[k]) for k in kept)


# --------------------------------------------------------------------------- 4. untrusted files


CODE_FILES = [p for p in REPO.rglob("*.py") if ".git" not in p.parts and "tests" not in p.parts]


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_passes_weights_only_true_and_yaml_is_loaded_safely():
    import ast

    loads, bad = 0, []
    for path in CODE_FILES:
        tree = ast.parse(path.read_text())
        for node, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                        "torch.jit.load", "np.load", "numpy.load"):
                kw = {k.arg: k.value for k in node.keywords}
                if name.endswith("np.load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                        and kw["allow_pickle"].value is False:
                    continue
                bad.append(f"{where}: {name}")
    assert loads >= 2 and not bad, bad  # checkpoint.load_training_state and train_dpo's reference logits


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_in_a_checkpoint(reference_1p, tmp_path):
    ref, _ = reference_1p
    run = _copy_run(ref, tmp_path / "run")
    marker = tmp_path / "PWNED"
    last = run / "checkpoints" / "step_0000010"
    torch.save({"optimizer": _Payload(marker)}, last / "training_state.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        ckpt.load_training_state(last)
    with pytest.raises(pickle.UnpicklingError):  # the same guard train_dpo.py's reference logits rely on
        torch.load(last / "training_state.pt", weights_only=True)
    assert not marker.exists()


def _bin_folder(tiny: Path, dst: Path, payload: Path | None, keep_safetensors: bool) -> Path:
    from safetensors.torch import load_file

    dst.mkdir()
    for item in tiny.iterdir():
        if item.name != "model.safetensors" or keep_safetensors:
            (dst / item.name).symlink_to(item)
    state = load_file(str(tiny / "model.safetensors"))
    if payload is not None:
        state["extra"] = _Payload(payload)
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_bin_weights_load_only_through_weights_only_and_safetensors_win(tiny_model, tmp_path):
    from sa2va.evaluation import load_model
    from sa2va.model import load_sa2va, predict_probabilities

    marker = tmp_path / "PWNED"
    # A plain .bin (no safetensors) loads: transformers 5 reads it with torch.load(weights_only=True).
    plain = load_sa2va(_bin_folder(tiny_model, tmp_path / "bin_plain", None, False), True, device="cpu")
    reference = load_sa2va(tiny_model, True, device="cpu")
    image = np.zeros((32, 32, 3), np.uint8)
    np.testing.assert_array_equal(predict_probabilities(plain, [image])[0],
                                  predict_probabilities(reference, [image])[0])
    # A .bin whose pickle would run code is refused, and the code does not run.
    evil = _bin_folder(tiny_model, tmp_path / "bin_evil", marker, False)
    with pytest.raises(UserError, match="cannot load the model"):
        load_model(evil, True, "cpu")
    assert not marker.exists()
    # With model.safetensors present, the .bin is never opened.
    both = load_sa2va(_bin_folder(tiny_model, tmp_path / "bin_and_safetensors", marker, True), True, device="cpu")
    assert both is not None and not marker.exists()


def test_remote_code_runs_only_when_the_user_turns_it_on(tiny_model, monkeypatch):
    import transformers
    import transformers.dynamic_module_utils as dmu

    from sa2va.model import load_sa2va

    def tripwire(*_a, **_k):
        raise AssertionError("remote code was imported")

    monkeypatch.setattr(dmu, "get_class_from_dynamic_module", tripwire)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", tripwire)
    with pytest.raises(UserError) as err:
        load_sa2va(tiny_model, trust_remote_code=False, device="cpu")
    for name in ("configuration_sa2va_chat.py", "modeling_sa2va_chat.py", "sam2.py", "trust_remote_code=true"):
        assert name in str(err.value)
    # The entrypoints never say yes themselves: only load_sa2va passes trust_remote_code=True on.
    import ast

    for path in [REPO / "train_dpo.py", REPO / "evaluate.py", REPO / "curate_data.py", *(REPO / "sa2va").glob("*.py")]:
        if path.name in ("model.py", "baseline.py"):  # baseline.py loads the tiny model it has just written
            continue
        for node, _ in _calls(ast.parse(path.read_text())):
            for k in node.keywords:
                assert not (k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value), \
                    f"{path.name}:{node.lineno} passes trust_remote_code=True"


def test_curate_trusts_the_config_only_for_the_config_model(tiny_model, tmp_path, monkeypatch):
    import curate_data

    args = curate_data.parse_args(["--min-gap", "0.1", "--model", str(tiny_model)])
    predictor = curate_data.LazyPredictor(args)
    assert predictor.trust is False  # configs/v8.yaml says true, but for its own model.path only
    with pytest.raises(UserError, match="trust_remote_code"):
        predictor([np.zeros((16, 16, 3), np.uint8)])


def test_trusted_remote_code_is_announced(tiny_model, capsys):
    from sa2va.model import load_sa2va

    load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    said = capsys.readouterr()
    assert "modeling_sa2va_chat.py" in said.out + said.err
