"""Family adapters: detection from config.json, the refusal of an unknown family."""

import json
import shutil

import pytest

from sa2va.errors import UserError
from sa2va.families import detect_family
from sa2va.model import check_model_folder


def test_family_is_read_from_config_json_not_the_folder_name(tiny_model, tmp_path):
    # A folder named like another family still loads as what its config.json says.
    renamed = tmp_path / "Sa2VA-Qwen3-VL-4B"
    shutil.copytree(tiny_model, renamed)
    config = check_model_folder(renamed)
    assert detect_family(config, renamed / "config.json").name == "internvl"


def test_unknown_family_is_refused_in_one_line_naming_the_config_class(tiny_model, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["llm_config"]
    config["auto_map"] = {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigPhi4",
                          "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        check_model_folder(folder)
    message = str(err.value)
    assert "\n" not in message and "Sa2VAChatConfigPhi4" in message and "internvl" in message and "qwen_vl" in message


def test_qwen_vl_family_detected_and_its_processor_required(tmp_path):
    from sa2va.tiny_qwen_vl import write_qwen_vl_checkpoint

    folder = write_qwen_vl_checkpoint(tmp_path / "Sa2VA-1B", family="qwen3_vl", weights=False)
    config = check_model_folder(folder, need_weights=False)
    assert detect_family(config, folder / "config.json").name == "qwen_vl"
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="preprocessor_config.json"):
        check_model_folder(folder, need_weights=False)


def test_post_init_repair_is_not_fooled_by_a_comment():
    from sa2va.compat import _init_calls_post_init

    code = ("class M:\n    def __init__(self):\n        # like the release, no self.post_init() here\n"
            "        self.x = 1\n\nclass N:\n    def __init__(self):\n        self.post_init()\n")
    assert not _init_calls_post_init(code, "M")
    assert _init_calls_post_init(code, "N")


def test_sam2_resize_filter_is_the_release_default_unless_the_folder_declares_one(tmp_path):
    from PIL import Image

    from sa2va.model import sam_resize_filter

    # The release's DirectResize uses PIL's default filter (bicubic); our look-alikes say bilinear.
    assert sam_resize_filter({}, tmp_path) == Image.BICUBIC
    assert sam_resize_filter({"sam2_resize": "bilinear"}, tmp_path) == Image.BILINEAR
    with pytest.raises(UserError, match="sam2_resize"):
        sam_resize_filter({"sam2_resize": "lanczos"}, tmp_path)


def test_tiny_internvl_folder_declares_its_bilinear_resize(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["sam2_resize"] == "bilinear"


def test_internvl_mlp1_trained_caches_before_it_and_gives_the_same_forward(tiny_model):
    """The shared projector interface on the InternVL family: the cache stops before mlp1, mlp1
    runs in the trained part, the logits are those of the frozen-mlp1 forward, and only mlp1 of
    the vision side gets gradients."""
    import torch

    from sa2va.config import load_config
    from sa2va.model import add_lora_and_freeze, encode_frozen, load_sa2va, prepare_images, seg_logits
    from sa2va.synth import make_sample

    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    sa2va.model.requires_grad_(False)
    inputs = prepare_images(sa2va, [make_sample(3, k, 96)[0] for k in range(2)])
    question, answer = "Please segment the blood vessels.", "It is [SEG]."
    merged = encode_frozen(sa2va, inputs)
    with torch.no_grad():
        expected = seg_logits(sa2va, merged, question, answer)
    cfg = load_config("tiny")
    cfg.train_modules.mlp1 = True
    add_lora_and_freeze(sa2va, cfg.lora, cfg.train_modules)
    cached = encode_frozen(sa2va, inputs)
    assert cached.vit.shape[-1] == sa2va.model.mlp1[0].normalized_shape[0] != merged.vit.shape[-1]
    logits = seg_logits(sa2va, cached, question, answer)
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
    logits.float().square().mean().backward()
    got = {n for n, p in sa2va.model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert any(n.startswith("mlp1.") for n in got) and not any(n.startswith("vision_model.") for n in got)
