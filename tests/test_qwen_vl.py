"""The Qwen-VL family (Sa2VA "codebase v2") through the suite's one [SEG] forward.

Real parts: the project's tiny Qwen2.5-VL / Qwen3-VL look-alikes (transformers' own Qwen-VL
modules, the release's surface and quirks), loaded through AutoModel with trust_remote_code,
the release-style predict_forward, train_dpo.py and evaluate.py as a user runs them.
"""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_ok
from PIL import Image

from sa2va.config import load_config
from sa2va.errors import UserError
from sa2va.model import (SegPolicy, add_lora_and_freeze, encode_frozen, freeze_unreachable, load_sa2va,
                         predict_probabilities, prepare_images, projector_trained, prompt_ids, seg_logits)
from sa2va.synth import make_sample

QUESTION, ANSWER = "Please segment the blood vessels.", "It is [SEG]."


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    from sa2va.tiny_qwen_vl import write_qwen_vl_checkpoint

    return write_qwen_vl_checkpoint(tmp_path_factory.mktemp("qwen") / "q25", family="qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from sa2va.tiny_qwen_vl import write_qwen_vl_checkpoint

    return write_qwen_vl_checkpoint(tmp_path_factory.mktemp("qwen") / "q3", family="qwen3_vl", seed=0, warmup=False)


def _seg_inputs(sa2va, images):
    """[SEG] hidden states of the training forward, caught at text_hidden_fcs's input."""
    caught = []
    hook = sa2va.model.text_hidden_fcs.register_forward_hook(lambda m, i, o: caught.append(i[0].detach()))
    try:
        with torch.no_grad():
            logits = seg_logits(sa2va, encode_frozen(sa2va, prepare_images(sa2va, images)), QUESTION, ANSWER)
    finally:
        hook.remove()
    return caught[0], logits


def test_seg_state_and_mask_equal_the_release_generate_path(qwen25):
    from sa2va.evaluation import generate_mask, mask_dice

    sa2va = load_sa2va(qwen25, trust_remote_code=True, device="cpu")
    assert sa2va.family.name == "qwen_vl"
    images = [make_sample(5, k, 128)[0] for k in range(2)]
    forward_hidden, _ = _seg_inputs(sa2va, images)
    forward_masks = [p > 0.5 for p in predict_probabilities(sa2va, images)]
    caught = []
    hook = sa2va.model.text_hidden_fcs.register_forward_hook(lambda m, i, o: caught.append(i[0].detach()))
    for i, image in enumerate(images):
        caught.clear()
        mask, text, n_seg = generate_mask(sa2va, image, QUESTION)  # predict_forward(..., processor=...) on CPU
        assert text == ANSWER + "<|im_end|>" and n_seg == 1  # teacher-forced answer = generated answer
        torch.testing.assert_close(caught[0][0], forward_hidden[i], atol=1e-5, rtol=1e-5)
        assert mask.any() and mask_dice(mask, forward_masks[i]) > 0.99  # release: SAM2 input rounded to bf16
        sa2va.model.torch_dtype = torch.float32  # without that rounding the masks are the same
        mask32, _, _ = generate_mask(sa2va, image, QUESTION)
        sa2va.model.torch_dtype = torch.bfloat16
        assert np.array_equal(mask32, forward_masks[i])
    hook.remove()


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_forward_equals_the_release_models_teacher_forced_forward(family, request):
    """M-RoPE from the grid, image embeddings (and Qwen3-VL's deepstack) at <|image_pad|>: the
    [SEG] state equals the one transformers' own Qwen-VL forward gives on the processor's input."""
    from qwen_vl_utils import process_vision_info

    sa2va = load_sa2va(request.getfixturevalue(family), trust_remote_code=True, device="cpu")
    image = make_sample(6, 0, 96)[0]
    forward_hidden, _ = _seg_inputs(sa2va, [image])
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": "\n" + QUESTION}]}]
    prompt = sa2va.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = sa2va.processor(text=[prompt + ANSWER], images=process_vision_info(messages)[0], return_tensors="pt",
                             min_pixels=sa2va.model.min_pixels, max_pixels=sa2va.model.max_pixels)
    ids = inputs["input_ids"][0].tolist()
    grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
    assert ids == prompt_ids(sa2va, grid, QUESTION, ANSWER)
    with torch.no_grad():
        out = sa2va.model.model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1][0, ids.index(sa2va.seg_token_id)], forward_hidden[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_merger_trained_caches_its_input_and_gives_the_same_forward(family, request):
    """train_modules.mlp1 = the vision merger: the cache stops before it (one row per merged
    patch, its patch features side by side, in image order: Qwen2.5-VL's window order undone),
    the merger runs in the trained part, and the logits are those of the frozen-merger forward."""
    cfg = load_config("tiny")
    sa2va = load_sa2va(request.getfixturevalue(family), trust_remote_code=True, device="cpu")
    sa2va.model.requires_grad_(False)
    inputs = prepare_images(sa2va, [make_sample(7, k, 96 + 32 * k)[0] for k in range(2)])  # 4 / 9 windows
    merged = encode_frozen(sa2va, inputs)
    with torch.no_grad():
        expected = seg_logits(sa2va, merged, QUESTION, ANSWER)
    cfg.train_modules.mlp1 = True
    add_lora_and_freeze(sa2va, cfg.lora, cfg.train_modules)  # LoRA B starts at zero: the same function
    assert projector_trained(sa2va)
    cached = encode_frozen(sa2va, inputs)
    visual = sa2va.model.model.model.visual
    unit = visual.spatial_merge_size ** 2
    width = sa2va.model.config.vision_config.hidden_size
    assert cached.vit.shape == (merged.vit.shape[0], unit * width) and cached.tiles == merged.tiles
    assert [x.shape for x in cached.extra] == [x.shape for x in merged.extra]  # deepstack rows line up
    with torch.no_grad():
        torch.testing.assert_close(seg_logits(sa2va, cached, QUESTION, ANSWER), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seg_logits(sa2va, cached.select([1]), QUESTION, ANSWER), expected[1:],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mlp1", [False, True])
def test_gradients_reach_exactly_the_trained_parts(qwen3, mlp1):
    cfg = load_config("tiny")
    cfg.train_modules.mlp1 = mlp1
    sa2va = load_sa2va(qwen3, trust_remote_code=True, device="cpu")
    add_lora_and_freeze(sa2va, cfg.lora, cfg.train_modules)
    features = encode_frozen(sa2va, prepare_images(sa2va, [make_sample(7, k, 96)[0] for k in range(2)]))
    policy = SegPolicy(sa2va, cfg.model.question, cfg.model.answer)
    freeze_unreachable(policy, features, sa2va)
    with torch.no_grad():
        for name, p in sa2va.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)  # so that lora_A sees a gradient too
    policy(features).float().square().mean().backward()
    got = {n for n, p in sa2va.model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    trained = {n for n, p in sa2va.model.named_parameters() if p.requires_grad}
    assert got <= trained
    assert any(n.startswith("text_hidden_fcs.") for n in got)
    assert any(n.startswith("model.model.language_model.") and "lora_A" in n for n in got)
    assert any(n.startswith("model.model.language_model.") and "lora_B" in n for n in got)
    assert any("sam_mask_decoder" in n for n in got)
    merger = {n for n, _ in sa2va.model.named_parameters() if n.startswith("model.model.visual.merger.")}
    assert merger and (merger <= got if mlp1 else not merger & trained)  # every merger weight, or none
    # The rest of the vision tower (Qwen3-VL's deepstack mergers too) stays frozen.
    assert not any(n.startswith(("model.model.visual.", "model.lm_head.", "grounding_encoder.sam2_model.image_encoder"))
                   for n in trained - merger)
    # Names round-trip between the policy and the model (checkpoints and export use the model's).
    assert all(policy.to_model_name(policy.from_model_name(n)) == n for n in trained)


def test_train_with_the_merger_export_reload_and_both_evaluation_paths(qwen25, tiny_pairs, tmp_path):
    from safetensors import safe_open

    from sa2va.checkpoint import load_for_inference
    from sa2va.evaluation import main as evaluate_main

    out = tmp_path / "run"
    # Everything that can train on this family: LoRA, text_hidden_fcs, mask decoder, vision merger.
    run_ok([sys.executable, "train_dpo.py", "--cfg", "tiny", f"model.path={qwen25}", f"data.root={tiny_pairs}",
            f"output_dir={out}", "max_steps=2", "train.micro_batch_size=1", "train.save_every=0",
            "train_modules.mlp1=true"])
    final = out / "final"
    # The export keeps the release's parameter names, so the release's code loads it.
    tensors = lambda f: safe_open(str(f / "model.safetensors"), "pt")  # noqa: E731
    assert set(tensors(final).keys()) == set(tensors(qwen25).keys())
    moved = {k for k in tensors(final).keys() if k.startswith("model.model.visual.")
             and not torch.equal(tensors(final).get_tensor(k), tensors(qwen25).get_tensor(k))}
    assert moved and all(k.startswith("model.model.visual.merger.") for k in moved)  # the merger trained, alone
    images = [make_sample(8, k, 128)[0] for k in range(2)]
    exported = load_sa2va(final, trust_remote_code=True, device="cpu")
    trained = load_for_inference(out / "checkpoints" / "step_0000002", True, device="cpu")
    base = load_sa2va(qwen25, trust_remote_code=True, device="cpu")
    _, z_export = _seg_inputs(exported, images)
    _, z_trained = _seg_inputs(trained, images)
    _, z_base = _seg_inputs(base, images)
    torch.testing.assert_close(z_export, z_trained, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z_export, z_base, atol=1e-4)  # training changed the policy

    assert evaluate_main(["--model", str(final), "--data", str(tiny_pairs), "--trust-remote-code",
                          "--path", "both", "--all-images", "--out", str(tmp_path / "eval"), "--n-boot", "50"]) == 0
    agreement = json.loads((tmp_path / "eval" / "results.json").read_text())["agreement"]
    assert agreement["fraction_with_seg"] == 1.0 and agreement["mean_dice"] > 0.99
