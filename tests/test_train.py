"""Training: gradients, the 2-process run, kill-and-resume, export, and refusals.

Real parts throughout: the tiny checkpoint loaded through AutoModel with trust_remote_code,
real torchrun processes (gloo on CPU), real files.
"""

import ast
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_ok, trained_tensors

from sa2va.config import load_config
from sa2va.fileio import read_rgb
from sa2va.model import SegPolicy, add_lora_and_freeze, encode_frozen, freeze_unreachable, load_sa2va, prepare_images

TRAIN = [sys.executable, "train_dpo.py", "--cfg", "tiny"]
TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_dpo.py", "--cfg", "tiny"]


def common(model, data, out, *extra):
    return [f"model.path={model}", f"data.root={data}", f"output_dir={out}", "train.micro_batch_size=1", *extra]


def test_gradients_reach_lora_text_fcs_and_mask_decoder_only(tiny_model, tiny_pairs):
    # The tiny checkpoint's sam2.py still carries the release's decorators: training must not need patching.
    tree = ast.parse((tiny_model / "sam2.py").read_text())
    decorated = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                 for d in n.decorator_list if "no_grad" in ast.unparse(d) or "inference_mode" in ast.unparse(d)]
    assert len(decorated) == 5

    cfg = load_config("tiny")
    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    add_lora_and_freeze(sa2va, cfg.lora, cfg.train_modules)
    images = [read_rgb(p) for p in sorted((tiny_pairs / "images").glob("*.png"))[:2]]
    features = encode_frozen(sa2va, prepare_images(sa2va, images))
    policy = SegPolicy(sa2va, cfg.model.question, cfg.model.answer)
    unreachable = freeze_unreachable(policy, features, sa2va)
    assert unreachable and all("iou_prediction_head" in n or "pred_obj_score_head" in n for n in unreachable)

    def backward():
        sa2va.model.zero_grad(set_to_none=True)
        policy(features).float().square().mean().backward()
        return {n: p.grad for n, p in sa2va.model.named_parameters()}

    grads = backward()
    for name, param in sa2va.model.named_parameters():
        if not param.requires_grad:
            assert grads[name] is None, f"frozen {name} got a gradient"
    def nonzero(prefix, contains=""):
        hits = [g for n, g in grads.items() if n.startswith(prefix) and contains in n and g is not None]
        return len(hits) > 0 and all(float(g.abs().sum()) > 0 for g in hits), len(hits)

    assert nonzero("text_hidden_fcs")[0]
    assert nonzero("language_model", "lora_B")[0]  # lora_A gets zero until B moves off zero
    decoder = [n for n, p in sa2va.model.named_parameters() if p.requires_grad and "sam_mask_decoder" in n
               and "output_hypernetworks_mlps" not in n]  # only the chosen mask token's MLP sees a gradient
    assert decoder and all(float(grads[n].abs().sum()) > 0 for n in decoder)
    # After one step on the B matrices, the A matrices get a gradient too.
    with torch.no_grad():
        for n, p in sa2va.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    grads = backward()
    assert nonzero("language_model", "lora_A")[0]
    assert not any(g is not None for n, g in grads.items() if n.startswith(("vision_model", "mlp1")))


def test_two_processes_match_one_process_with_twice_the_accumulation(tiny_model, tiny_pairs, tmp_path):
    # 2 ranks x accumulation 2 and 1 rank x accumulation 4 see the same 4 pairs per step.
    args = ["max_steps=2", "lora.dropout=0.0", "train.save_every=0"]
    run_ok(TORCHRUN2 + common(tiny_model, tiny_pairs, tmp_path / "two", "train.grad_accum=2", *args))
    run_ok(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "one", "train.grad_accum=4", *args))
    two = trained_tensors(tmp_path / "two" / "checkpoints" / "step_0000002")
    one = trained_tensors(tmp_path / "one" / "checkpoints" / "step_0000002")
    assert two.keys() == one.keys()
    base = load_sa2va_trained_start(tiny_model)
    moved = [k for k in one if k in base and not np.allclose(one[k], base[k])]
    assert moved, "training changed nothing"
    for key in one:
        np.testing.assert_allclose(two[key], one[key], atol=2e-6, rtol=1e-4, err_msg=key)
    first = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss_mask_dpo"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start


def load_sa2va_trained_start(model_dir):
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def test_kill_and_resume_ends_with_the_same_weights(tiny_model, tiny_pairs, tmp_path):
    args = ["max_steps=5", "train.save_every=2", "train.grad_accum=1"]  # LoRA dropout on: RNG must resume too
    run_ok(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "straight", *args))
    killed = subprocess.run(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "cut", *args), cwd=REPO,
                            capture_output=True, text=True, env={**__import__("os").environ, "SA2VA_DPO_KILL_AT_STEP": "3"})
    assert killed.returncode != 0
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == ["step_0000002"], saved
    run_ok(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "cut", *args) + ["--resume"])
    a = trained_tensors(tmp_path / "straight" / "checkpoints" / "step_0000005")
    b = trained_tensors(tmp_path / "cut" / "checkpoints" / "step_0000005")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-7, err_msg=key)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]

    # The export loads like the original and predicts what the checkpoint-over-base predicts.
    from sa2va.checkpoint import load_for_inference
    from sa2va.model import predict_probabilities

    images = [read_rgb(p) for p in sorted((tiny_pairs / "images").glob("*.png"))[:2]]
    exported = load_sa2va(tmp_path / "cut" / "final", trust_remote_code=True, device="cpu")
    over_base = load_for_inference(tmp_path / "cut" / "checkpoints" / "step_0000005", True, device="cpu")
    for p, q in zip(predict_probabilities(exported, images), predict_probabilities(over_base, images)):
        np.testing.assert_allclose(p, q, atol=1e-4)
    original = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    assert not np.allclose(predict_probabilities(original, images)[0], predict_probabilities(exported, images)[0])


def run_fails(cmd):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_bad_input_is_refused_with_one_line(tiny_model, tiny_pairs, tmp_path):
    msg = run_fails(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "o", "model.trust_remote_code=false"))
    assert "trust_remote_code" in msg and "modeling_sa2va_chat.py" in msg
    msg = run_fails(TRAIN + common(tmp_path / "nomodel", tiny_pairs, tmp_path / "o"))
    assert "does not exist" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dpo_annotations.json").write_text(json.dumps([{"image": "images/x.png", "chosen_mask": "m.png"}]))
    msg = run_fails(TRAIN + common(tiny_model, bad, tmp_path / "o"))
    assert "rejected_mask" in msg and "entry 0" in msg
    (bad / "dpo_annotations.json").write_text(json.dumps(
        [{"image": "../../etc/passwd", "chosen_mask": "m.png", "rejected_mask": "r.png"}]))
    msg = run_fails(TRAIN + common(tiny_model, bad, tmp_path / "o"))
    assert "leaves the data folder" in msg
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_model, tiny_pairs, tmp_path):
    out = tmp_path / "nan"
    msg = run_fails(TRAIN + common(tiny_model, tiny_pairs, out, "optim.lr=1e30", "optim.grad_clip=0",
                                   "train.max_bad_steps=2", "max_steps=20", "train.save_every=1"))
    assert "non-finite steps in a row" in msg
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] >= 1
    # Checkpoints written before the blow-up are complete and loadable.
    from sa2va.checkpoint import latest_checkpoint

    assert latest_checkpoint(out) is not None
