"""The tiny Sa2VA-format checkpoint: loads like a real release, has its public surface, trains.

Checkpoints are written once per module (write + warm-up take a few seconds each).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va.errors import UserError
from sa2va.tiny import PRESETS, num_image_token, preset_config_dict, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "[SEG]", "<p>", "</p>", "<vp>", "</vp>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {
        "a": write_tiny_checkpoint(base / "a", seed=0),
        "a2": write_tiny_checkpoint(base / "a2", seed=0),
        "b": write_tiny_checkpoint(base / "b", seed=1, warmup=False),
        "noweights": write_tiny_checkpoint(base / "nw", seed=0, weights=False),
        "base": base,
    }


@pytest.fixture(scope="module")
def loaded(ckpts):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(ckpts["a"]), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpts["a"]), trust_remote_code=True)
    return model.eval(), tokenizer


def test_folder_layout_and_config(ckpts):
    folder = ckpts["a"]
    for name in ["config.json", "configuration_sa2va_chat.py", "modeling_sa2va_chat.py", "sam2.py",
                 "tokenizer.json", "tokenizer_config.json", "model.safetensors", "generation_config.json"]:
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "sa2va_chat"
    assert cfg["architectures"] == ["Sa2VAChatModel"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_sa2va_chat.Sa2VAChatModel"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_sa2va_chat.Sa2VAChatConfig"
    assert cfg["template"] == "qwen_chat" and cfg["ps_version"] == "v2" and cfg["downsample_ratio"] == 0.5
    assert cfg["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["max_dynamic_patch"] == 4 and cfg["sam2_config"]["image_size"] == 512
    # remote code is self-contained: it never imports our package
    for name in ["configuration_sa2va_chat.py", "modeling_sa2va_chat.py", "sam2.py"]:
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "sa2va" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] != "sa2va", name


def test_model_surface(loaded):
    model, _ = loaded
    assert [n for n, _ in model.named_children()] == ["vision_model", "language_model", "mlp1", "grounding_encoder", "text_hidden_fcs"]
    keys = model.state_dict().keys()
    for k in ["mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "text_hidden_fcs.0.weight", "text_hidden_fcs.2.weight"]:
        assert k in keys
    assert model.img_context_token_id is None
    assert model.num_image_token == (64 // 8) ** 2 // 4 == 16
    assert "num_image_token" not in json.loads(json.dumps(model.config.to_dict()))
    assert model.template == "qwen_chat" and model.downsample_ratio == 0.5 and model.ps_version == "v2"
    assert model.select_layer == -1 and model.patch_size == 8
    ge = model.grounding_encoder
    assert type(ge).__name__ == "SAM2TrainRunner" and ge.hidden_dim == 256
    sam = ge.sam2_model
    for child in ["image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "memory_attention", "memory_encoder", "obj_ptr_proj"]:
        assert hasattr(sam, child), child
    assert tuple(sam.no_mem_embed.shape) == (1, 1, 256)
    assert sam.image_size == 512 and sam.num_feature_levels == 3 and sam.use_high_res_features_in_sam
    img = torch.full((3, 4, 4), 255.0)
    out = ge.preprocess_image(img)
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_tokenizer_special_tokens(loaded):
    _, tok = loaded
    for t in SPECIAL:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_tokens_to_ids(t) == ids[0], t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Ünïcode text, 123 & émojis 🙂 still encode."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_sam2_decorators_present():
    tree = ast.parse((REPO / "sa2va" / "remote_code" / "sam2.py").read_text())
    found = set()
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef)]:
            for dec in fn.decorator_list:
                found.add((cls.name, fn.name, ast.unparse(dec)))
    expected = {
        ("PositionEmbeddingSine", "encode_boxes", "torch.no_grad()"),
        ("PositionEmbeddingSine", "encode_points", "torch.no_grad()"),
        ("PositionEmbeddingSine", "forward", "torch.no_grad()"),
        ("SAM2VideoPredictor", "propagate_in_video_preflight", "torch.inference_mode()"),
        ("SAM2VideoPredictor", "propagate_in_video", "torch.inference_mode()"),
    }
    assert {d for d in found if "no_grad" in d[2] or "inference_mode" in d[2]} == expected
    lines = [ln.strip() for ln in (REPO / "sa2va" / "remote_code" / "sam2.py").read_text().splitlines()]
    assert sum(ln in ("@torch.no_grad()", "@torch.inference_mode()") for ln in lines) == 5


def _seg_path(model, images, seg_embedding):
    """The gradient-carrying [SEG] -> mask path of SA2VA_INTERFACE.md, steps 1-6."""
    sam = model.grounding_encoder.sam2_model
    feats = sam.forward_image(images)
    _, vision_feats, _, sizes = sam._prepare_backbone_features(feats)
    b = images.shape[0]
    hr = [x.permute(1, 2, 0).reshape(b, x.shape[-1], *s) for x, s in zip(vision_feats[:-1], sizes[:-1])]
    pix = (vision_feats[-1] + sam.no_mem_embed).permute(1, 2, 0).reshape(b, 256, *sizes[-1])
    return sam._forward_sam_heads(
        backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=hr,
        multimask_output=sam._use_multimask(True, None), language_embd=seg_embedding[:, None],
    )


def test_gradients_reach_seg_path(loaded):
    model, _ = loaded
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 512, 512)
    hidden = torch.randn(2, model.config.llm_config.hidden_size, requires_grad=True)
    out = _seg_path(model, images, model.text_hidden_fcs(hidden))
    assert len(out) == 7
    assert tuple(out[3].shape) == (2, 1, 128, 128)
    assert tuple(out[4].shape) == (2, 1, 512, 512)
    assert tuple(out[0].shape) == (2, 3, 128, 128)
    out[3].square().mean().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    for name, p in model.text_hidden_fcs.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    dec = model.grounding_encoder.sam2_model.sam_mask_decoder
    for name in ["conv_s0.weight", "conv_s1.weight", "transformer.layers.0.self_attn.q_proj.weight", "upscale_conv1.weight"]:
        assert dict(dec.named_parameters())[name].grad.abs().sum() > 0, name
    # all outputs together reach every decoder parameter except the single-mask hypernetwork
    # (token 0), which multimask output drops in real SAM2 too
    model.zero_grad(set_to_none=True)
    out = _seg_path(model, images, model.text_hidden_fcs(hidden))
    (out[0].square().mean() + out[2].sum() + out[6].sum()).backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing and all(n.startswith("output_hypernetworks_mlps.0.") for n in missing), missing
    model.zero_grad(set_to_none=True)


def test_predict_forward_segments(loaded):
    from sa2va.compat import fix_sam2_device

    model, tok = loaded
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(70, 110, 3)).astype(np.uint8))
    if not torch.cuda.is_available():  # sam2.py's video path hard-codes CUDA, as the release's does
        with pytest.raises((RuntimeError, AssertionError)):
            model.predict_forward(image=img, text="<image>Please segment the blood vessels.", tokenizer=tok)
    fix_sam2_device(model)  # what load_sa2va does to every loaded model
    out = model.predict_forward(image=img, text="<image>Please segment the blood vessels.", tokenizer=tok)
    assert "[SEG]" in out["prediction"]
    assert len(out["prediction_masks"]) == out["prediction"].count("[SEG]") == 1
    mask = out["prediction_masks"][0]
    assert mask.dtype == np.bool_ and mask.shape == (1, 70, 110)
    assert model.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    # the text without the <image> placeholder works too
    out = model.predict_forward(image=img.resize((200, 60)), text="Please segment the blood vessels.", tokenizer=tok)
    assert "[SEG]" in out["prediction"] and out["prediction_masks"][0].shape == (1, 60, 200)


def test_same_seed_same_bytes(ckpts):
    for name in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"]:
        assert (ckpts["a"] / name).read_bytes() == (ckpts["a2"] / name).read_bytes(), name
    assert (ckpts["a"] / "model.safetensors").read_bytes() != (ckpts["b"] / "model.safetensors").read_bytes()
    assert (ckpts["a"] / "tokenizer.json").read_bytes() == (ckpts["b"] / "tokenizer.json").read_bytes()


def test_no_weights_from_config(ckpts):
    from transformers import AutoConfig, AutoModel

    folder = ckpts["noweights"]
    assert not (folder / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModel.from_config(cfg, trust_remote_code=True)
    assert type(model).__name__ == "Sa2VAChatModel" and model.num_image_token == 16
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 10e6


def test_config_round_trip(ckpts, tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ckpts["a"]), trust_remote_code=True)
    cfg.save_pretrained(str(tmp_path))
    again = AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=True)
    for key in ["hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"]:
        assert getattr(again.llm_config, key) == getattr(cfg.llm_config, key)
    assert again.vision_config.hidden_size == cfg.vision_config.hidden_size
    assert again.sam2_config == cfg.sam2_config and again.template == "qwen_chat"


def test_write_refuses_bad_input(ckpts, tmp_path):
    with pytest.raises(UserError):
        write_tiny_checkpoint(ckpts["a"])  # exists, not empty
    with pytest.raises(UserError):
        write_tiny_checkpoint(tmp_path / "x", preset="70b")
    with pytest.raises(UserError):
        write_tiny_checkpoint(tmp_path / "y", seed=-1)
    with pytest.raises(UserError):
        write_tiny_checkpoint(tmp_path / "missing" / "z")
    with pytest.raises(UserError):
        write_tiny_checkpoint(tmp_path / "w", preset="26b")  # real sizes need --no-weights
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--preset", "70b"], ["--seed", "abc"], ["--seed", "-3"]])
def test_cli_bad_input(tmp_path, args):
    res = subprocess.run([sys.executable, "-m", "sa2va.tiny", "--out", str(tmp_path / "o"), *args],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_existing_out(ckpts):
    res = subprocess.run([sys.executable, "-m", "sa2va.tiny", "--out", str(ckpts["a"]), "--no-weights"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def test_real_preset_configs():
    dims = {"1b": (896, 24, 14, 2, 4864, 1024, 24), "4b": (2048, 36, 16, 2, 11008, 1024, 24),
            "8b": (4096, 32, 32, 8, 14336, 1024, 24), "26b": (6144, 48, 48, 8, 16384, 3200, 45)}
    for preset, (h, layers, heads, kv, inter, vit_h, vit_layers) in dims.items():
        cfg = preset_config_dict(preset)
        llm, vit, sam = cfg["llm_config"], cfg["vision_config"], cfg["sam2_config"]
        assert (llm["hidden_size"], llm["num_hidden_layers"], llm["num_attention_heads"],
                llm["num_key_value_heads"], llm["intermediate_size"]) == (h, layers, heads, kv, inter)
        assert (vit["hidden_size"], vit["num_hidden_layers"]) == (vit_h, vit_layers)
        assert sam["image_size"] == 1024 and sam["trunk"]["embed_dim"] == 144
        assert sam["trunk"]["stages"] == [2, 6, 36, 4]
        assert cfg["force_image_size"] == 448 and cfg["max_dynamic_patch"] == 12
        assert num_image_token(preset) == 256
    assert preset_config_dict("26b")["vision_config"]["use_qk_norm"] is True
    assert preset_config_dict("1b")["llm_config"]["vocab_size"] == 151936
    assert set(PRESETS) == {"tiny", "1b", "4b", "8b", "26b"}
    for preset in ("8b", "26b"):  # the user's family: InternLM2 remote code, its template
        cfg = preset_config_dict(preset)
        assert cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"] and cfg["template"] == "internlm2_chat"
    # LLM parameter count by formula: Qwen2.5-0.5B is 494M with tied embeddings
    llm = preset_config_dict("1b")["llm_config"]
    h, i, v, L = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"], llm["num_hidden_layers"]
    kvd = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    per_layer = (h * h + h) + 2 * (h * kvd + kvd) + h * h + 3 * h * i + 2 * h
    assert abs((v * h + L * per_layer + h) / 1e6 - 494) < 1
