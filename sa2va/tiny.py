"""Write a Sa2VA-format checkpoint folder: the tiny test model, or the real sizes' configs.

    python -m sa2va.tiny --out DIR [--seed N] [--preset tiny|1b|4b|8b|26b] [--family qwen2|internlm2]
                         [--no-weights] [--no-warmup]

The folder holds config.json (model_type sa2va_chat, auto_map to the remote code), the three
remote-code files from sa2va/remote_code/ (copied verbatim, they never import `sa2va`), the
tokenizer (tokenizer.json + tokenizer_config.json), generation_config.json and, unless
--no-weights, model.safetensors. `--family internlm2` (and the 8b/26b presets) give the
Sa2VA-8B/26B layout instead: InternLM2 remote code and a sentencepiece tokenizer
(sa2va/tiny_internlm2.py). It loads with
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` like a real Sa2VA release.

Same seed => byte-identical model.safetensors and tokenizer files. The tiny preset is
warmed up (a few seconds of teacher-forced training of the LLM + mlp1) so that greedy
`predict_forward` answers a segmentation prompt with "It is [SEG]." like a real Sa2VA.
See docs/tiny_model.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, run_cli
from .fileio import atomic_dir
from . import compat, tiny_internlm2
from .remote_code.sam2 import HIERA_L_SAM2_CONFIG

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
# Every family ships the InternLM2 LLM code, as the release does: modeling_sa2va_chat imports it.
REMOTE_CODE_FILES = ("configuration_sa2va_chat.py", "modeling_sa2va_chat.py", "sam2.py",
                     "configuration_internlm2.py", "modeling_internlm2.py")
FAMILIES = ("qwen2", "internlm2")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "[SEG]",
    "<p>",
    "</p>",
    "<vp>",
    "</vp>",
]
TOKENIZER_VOCAB_SIZE = 1024

# A small built-in English corpus: the BPE merges are learnt from it (deterministically);
# any text still encodes because the tokenizer is byte-level.
_CORPUS = """
Please segment the blood vessels in this image. Could you segment the vessels? Segment the retinal
vessels. What is in this image? It is [SEG]. Sure, [SEG]. Sure, the segmentation result is [SEG].
The image shows a retina with arteries and veins. The vessel tree branches from the optic disc.
Please identify and segment the vessel structure. Can you please segment the vasculature in the
fundus photograph? Where are the vessels? Highlight the thin capillaries and the large vessels.
Segmentation of medical images is the task of labelling every pixel of an organ or a structure.
A mask is a binary image: one where the object is, zero elsewhere. The model answers with a mask.
Describe the image in detail. The picture contains a person, a dog, a car, a tree and a house.
Please give me a short description of the scene. There is a cat sitting on a red chair near the
window, and the sun is shining. This is a photo of a street with people walking and cars parked.
The quick brown fox jumps over the lazy dog. One two three four five six seven eight nine ten.
Angiography, microscopy, computed tomography and magnetic resonance images also show vessels.
The doctor asked the assistant to find the lesion, the optic disc, the fovea and the macula.
Thank you. You are welcome. Yes. No. Maybe. I think so. I do not know. Let me look again.
""".strip()

WARMUP_PROMPTS = [
    "Please segment the blood vessels.",
    "Please segment the blood vessels in this image.",
    "Segment the vessels.",
    "Segment the retinal vessels.",
    "Could you segment the vessels?",
    "Can you please segment the vasculature in the image?",
    "Please segment the vessel structure.",
    "Please identify and segment the blood vessels in this image.",
    "Highlight the vessels.",
    "Where are the vessels? Please segment them.",
]
WARMUP_ANSWER = "It is [SEG]."

# ----------------------------------------------------------------------------- presets

_TINY_SAM2 = {
    "image_size": 512,
    "hidden_dim": 256,
    "mem_dim": 64,
    "trunk": {
        "embed_dim": 16,
        "num_heads": 1,
        "stages": [1, 1, 2, 1],
        "global_att_blocks": [3],
        "window_spec": [8, 4, 8, 4],
        "window_pos_embed_bkg_spatial_size": [7, 7],
    },
    "fpn_top_down_levels": [2, 3],
    "num_feature_levels": 3,
    "mask_decoder": {
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "mlp_dim": 256,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 64,
        "num_multimask_outputs": 3,
    },
    "prompt_encoder": {"mask_in_chans": 16},
    "memory_attention": {"num_layers": 1, "dim_feedforward": 64, "num_heads": 1},
    "memory_encoder": {"fuser_layers": 1},
    "obj_ptr_proj_layers": 1,
    "multimask_output_in_sam": True,
}

# The real sizes' SAM2 Hiera-L: the remote code's own default, so the two cannot drift apart.
_HIERA_L_SAM2 = HIERA_L_SAM2_CONFIG

_VIT_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "attention_bias": True,
    "use_qk_norm": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "layer_scale_init_value": 0.1,
    "use_mean_pooling": True,
    "use_absolute_position_embeddings": True,
}
_VIT_6B = dict(
    _VIT_300M,
    hidden_size=3200,
    num_hidden_layers=45,
    num_attention_heads=25,
    intermediate_size=12800,
    attention_bias=False,
    use_qk_norm=True,
    norm_type="rms_norm",
)


def _qwen2(hidden, layers, heads, kv, inter, vocab, tie, max_pos=32768):
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }


PRESETS: dict = {
    "tiny": {
        "description": "tiny test model (CPU, seconds)",
        "template": "qwen_chat",
        "force_image_size": 64,
        "max_dynamic_patch": 4,
        "dtype": "float32",
        "vision": dict(
            _VIT_300M,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[64, 64],
            patch_size=[8, 8],
        ),
        "llm": _qwen2(64, 2, 4, 2, 128, TOKENIZER_VOCAB_SIZE, False, max_pos=4096),
        "sam2": _TINY_SAM2,
    },
    "1b": {
        "description": "Sa2VA-1B shapes: InternViT-300M + Qwen2.5-0.5B + SAM2 Hiera-L",
        "template": "qwen_chat",
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "dtype": "bfloat16",
        "vision": _VIT_300M,
        "llm": _qwen2(896, 24, 14, 2, 4864, 151936, True),
        "sam2": _HIERA_L_SAM2,
    },
    "4b": {
        "description": "Sa2VA-4B shapes: InternViT-300M + Qwen2.5-3B + SAM2 Hiera-L",
        "template": "qwen_chat",
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "dtype": "bfloat16",
        "vision": _VIT_300M,
        "llm": _qwen2(2048, 36, 16, 2, 11008, 151936, True),
        "sam2": _HIERA_L_SAM2,
    },
    "8b": {
        "description": "Sa2VA-8B shapes: InternViT-300M + InternLM2.5-7B (remote code) + SAM2 Hiera-L",
        "template": "internlm2_chat",
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "dtype": "bfloat16",
        "vision": _VIT_300M,
        "llm": tiny_internlm2.internlm2_llm(4096, 32, 32, 8, 14336, 92544,
                                            rope_scaling={"type": "dynamic", "factor": 2.0}),
        "sam2": _HIERA_L_SAM2,
    },
    "26b": {
        "description": "Sa2VA-26B shapes: InternViT-6B + InternLM2.5-20B (remote code) + SAM2 Hiera-L",
        "template": "internlm2_chat",
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "dtype": "bfloat16",
        "vision": _VIT_6B,
        "llm": tiny_internlm2.internlm2_llm(6144, 48, 48, 8, 16384, 92544,
                                            rope_scaling={"type": "dynamic", "factor": 2.0}),
        "sam2": _HIERA_L_SAM2,
    },
}
# The tiny model of the 8B/26B family: the same sizes as "tiny", the LLM and tokenizer of InternLM2.
_TINY_INTERNLM2 = dict(PRESETS["tiny"], template="internlm2_chat",
                       llm=tiny_internlm2.internlm2_llm(64, 2, 4, 2, 128, 1024, max_pos=4096))


def preset_family(preset: str) -> str:
    return "internlm2" if PRESETS[preset]["llm"]["architectures"][0] == "InternLM2ForCausalLM" else "qwen2"


def preset_config_dict(preset: str, family: str | None = None) -> dict:
    """The config.json content of a preset (without transformers' bookkeeping keys).

    family None = the preset's own; the tiny preset exists in both families."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose one of: {', '.join(PRESETS)})")
    if family is not None and family not in FAMILIES:
        raise UserError(f"unknown family {family!r} (choose one of: {', '.join(FAMILIES)})")
    p = PRESETS[preset]
    if family is not None and family != preset_family(preset):
        if preset != "tiny":
            raise UserError(f"preset {preset!r} is of the {preset_family(preset)} family, not {family!r}")
        p = _TINY_INTERNLM2
    vision = copy.deepcopy(p["vision"])
    vision["image_size"] = [p["force_image_size"], p["force_image_size"]]
    return {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
        },
        "model_type": "sa2va_chat",
        "template": p["template"],
        # The look-alike's predict_forward resizes the SAM2 input bilinearly (the release: bicubic);
        # the suite reads this so that its training forward matches the folder's own inference.
        "sam2_resize": "bilinear",
        "force_image_size": p["force_image_size"],
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": p["max_dynamic_patch"],
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": p["dtype"],
        "vision_config": vision,
        "llm_config": copy.deepcopy(p["llm"]),
        "sam2_config": copy.deepcopy(p["sam2"]),
    }


def num_image_token(preset: str) -> int:
    cfg = preset_config_dict(preset)
    patch = cfg["vision_config"]["patch_size"][0]
    return int((cfg["force_image_size"] // patch) ** 2 * cfg["downsample_ratio"] ** 2)


# ----------------------------------------------------------------------------- tokenizer


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def _write_tokenizer(folder: Path) -> int:
    tok = _build_tokenizer()
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {
        "additional_special_tokens": config["additional_special_tokens"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    return tok.get_vocab_size()


# ----------------------------------------------------------------------------- warm-up


def _random_image(rng: np.random.Generator):
    from PIL import Image

    w, h = int(rng.integers(24, 220)), int(rng.integers(24, 220))
    kind = int(rng.integers(0, 4))
    if kind == 0:  # noise
        arr = rng.integers(0, 256, size=(h, w, 3))
    elif kind == 1:  # flat colour
        arr = np.broadcast_to(rng.integers(0, 256, size=(1, 1, 3)), (h, w, 3))
    elif kind == 2:  # gradient
        gy = np.linspace(0, 1, h)[:, None, None]
        gx = np.linspace(0, 1, w)[None, :, None]
        a, b, c = rng.uniform(0, 255, size=(3, 1, 1, 3))
        arr = a * gy + b * gx + c * (1 - gx) * (1 - gy)
    else:  # dark background with bright lines (vessel-like)
        arr = np.zeros((h, w, 3)) + rng.uniform(0, 80, size=(1, 1, 3))
        for _ in range(int(rng.integers(1, 6))):
            x0, x1 = rng.integers(0, w, size=2)
            ys = np.linspace(0, h - 1, 200).astype(int)
            xs = np.linspace(x0, x1, 200).astype(int)
            arr[ys, xs] = rng.uniform(120, 255, size=3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _sample(model, tokenizer, rng, mc):
    """One (pixel tiles, prompt ids, answer ids) warm-up example through the model's own pipeline."""
    cfg = model.config
    img = _random_image(rng)
    tiles = mc.dynamic_preprocess(img, cfg.min_dynamic_patch, cfg.max_dynamic_patch, model.image_size, cfg.use_thumbnail)
    pv = torch.stack([mc.image_to_tensor(t, model.image_size) for t in tiles])
    image_str = f"{mc.IMG_START_TOKEN}{mc.IMG_CONTEXT_TOKEN * (model.num_image_token * len(tiles))}{mc.IMG_END_TOKEN}"
    prompt = WARMUP_PROMPTS[int(rng.integers(0, len(WARMUP_PROMPTS)))]
    style = int(rng.integers(0, 3))
    text = {0: "<image>\n" + prompt, 1: "<image>" + prompt, 2: "<image>\n" + prompt.lower()}[style]
    text = text.replace("<image>", image_str)
    instruction = mc.TEMPLATES[model.template]["INSTRUCTION"].format(input=text, round=1, bot_name="BOT")
    prompt_ids = tokenizer.encode(instruction, add_special_tokens=False)
    answer_ids = tokenizer.encode(WARMUP_ANSWER + mc.TEMPLATES[model.template]["SUFFIX"], add_special_tokens=False)
    return pv, prompt_ids, answer_ids


def _warmup(model, tokenizer, seed: int, min_steps: int = 60, max_steps: int = 600, batch: int = 4) -> dict:
    """Teacher-forced CE on 'It is [SEG].<|im_end|>' training only the LLM and mlp1."""
    import importlib

    mc = importlib.import_module(type(model).__module__)
    rng = np.random.default_rng(seed + 12345)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(mc.IMG_CONTEXT_TOKEN)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.language_model.parameters()) + list(model.mlp1.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    pad_id = tokenizer.pad_token_id
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in mc.TEMPLATES[model.template]["STOP_WORDS"]]
    checks = [_sample(model, tokenizer, np.random.default_rng(seed + 999 + i), mc) for i in range(6)]

    def passes() -> bool:
        model.eval()
        with torch.no_grad():
            for pv, prompt_ids, _ in checks:
                ids = torch.tensor(prompt_ids)[None]
                out = model.generate(
                    pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=8, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id,
                )
                seq = out.sequences[0].tolist()
                if seg_id not in seq or seq[-1] not in stop_ids:
                    return False
        return True

    step = 0
    loss_value = float("nan")
    t0 = time.perf_counter()
    while step < max_steps:
        model.train()
        examples = [_sample(model, tokenizer, rng, mc) for _ in range(batch)]
        length = max(len(p) + len(a) for _, p, a in examples)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for i, (_, p, a) in enumerate(examples):
            seq = p + a
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        pixel_values = torch.cat([pv for pv, _, _ in examples])
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        loss_value = out.loss.item()
        if step >= min_steps and step % 20 == 0 and loss_value < 0.05 and passes():
            break
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.img_context_token_id = None  # the release starts with None; callers set it
    return {"steps": step, "final_loss": loss_value, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- writer


def _load_remote_classes():
    import importlib

    cfg_mod = importlib.import_module("sa2va.remote_code.configuration_sa2va_chat")
    model_mod = importlib.import_module("sa2va.remote_code.modeling_sa2va_chat")
    return cfg_mod.Sa2VAChatConfig, model_mod.Sa2VAChatModel


def _build_model(config_dict: dict, seed: int):
    Sa2VAChatConfig, Sa2VAChatModel = _load_remote_classes()
    kwargs = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map", "torch_dtype")}
    config = Sa2VAChatConfig(**kwargs)
    compat.repair_rope_scaling(config)  # our InternLM2 code has the release's rope_scaling quirk
    torch.manual_seed(seed)
    model = Sa2VAChatModel(config)
    return model.float().eval()


def _save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def write_tiny_checkpoint(
    out: str | Path,
    seed: int = 0,
    preset: str = "tiny",
    weights: bool = True,
    warmup: bool = True,
    family: str | None = None,
) -> Path:
    """Write a Sa2VA-format checkpoint folder at `out` (refused if it exists and is not empty).

    family: "qwen2" (Sa2VA-1B/4B layout) or "internlm2" (Sa2VA-8B/26B layout); None = the
    preset's own (tiny: qwen2).

    weights=False writes everything but model.safetensors (build it with AutoConfig +
    AutoModel.from_config). Presets other than "tiny" need weights=False: random weights of
    those sizes are built on the GPU, not written to disk. The warm-up applies to "tiny" only.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose one of: {', '.join(PRESETS)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if weights and preset != "tiny":
        raise UserError(
            f"preset {preset!r} is only written with --no-weights (its random weights are built with "
            "AutoModel.from_config on the machine that uses them)"
        )
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"parent folder of --out does not exist: {out.parent}")
    config_dict = preset_config_dict(preset, family)
    family = family or preset_family(preset)

    with atomic_dir(out) as tmp:
        if family == "internlm2":
            ids = tiny_internlm2.write_tokenizer(tmp, _CORPUS.splitlines() + WARMUP_PROMPTS)
            vocab, stops, pad = max(ids.values()) + 1, [ids["<|im_end|>"], ids["</s>"]], ids["</s>"]
            code = REMOTE_CODE_FILES + tiny_internlm2.REMOTE_CODE_FILES
        else:
            vocab = _write_tokenizer(tmp)
            stops = [_token_id(tmp, "<|im_end|>"), _token_id(tmp, "<|endoftext|>")]
            pad, code = _token_id(tmp, "<|endoftext|>"), REMOTE_CODE_FILES
        if preset == "tiny":
            # the embedding is sized to the tokenizer (qwen2: rounded up; internlm2: exactly, like
            # the release, so that a shifted token id falls outside); real presets keep the real vocab
            rows = vocab if family == "internlm2" else int(-(-vocab // 64) * 64)
            config_dict["llm_config"]["vocab_size"] = rows
        for name in code:
            shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
        generation = {"do_sample": False, "max_new_tokens": 2048, "eos_token_id": stops, "pad_token_id": pad}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if weights:
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1)  # deterministic kernels
                with torch.random.fork_rng(devices=[]):
                    model = _build_model(config_dict, seed)
                    if warmup:
                        from transformers import AutoTokenizer

                        if family == "internlm2":
                            tokenizer = tiny_internlm2.load_slow_tokenizer(tmp)
                            compat.enable_generation(model.language_model)  # the warm-up generates
                        else:
                            tokenizer = AutoTokenizer.from_pretrained(str(tmp))
                        _warmup(model, tokenizer, seed)
            finally:
                torch.set_num_threads(threads)
            _save_weights(model, tmp / "model.safetensors")
        # config.json last: before it exists, AutoTokenizer reads the folder as a plain tokenizer
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return out


def _token_id(folder: Path, token: str) -> int:
    data = json.loads((folder / "tokenizer.json").read_text())
    for item in data["added_tokens"]:
        if item["content"] == token:
            return int(item["id"])
    raise KeyError(token)


# ----------------------------------------------------------------------------- CLI


def _parse_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got {text!r}") from None
    if value < 0 or value >= 2**32:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**32), got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other entrypoint
        raise UserError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m sa2va.tiny", description="Write a Sa2VA-format checkpoint folder.")
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", default=0, type=_parse_seed, help="weights seed (default 0)")
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--family", default=None,
                        help=f"{' or '.join(FAMILIES)} (InternVL code, the LLM family; default: the preset's own, "
                             "tiny: qwen2), or qwen2_5_vl / qwen3_vl (Qwen-VL code, sa2va/tiny_qwen_vl.py)")
    parser.add_argument("--no-weights", action="store_true", help="write config, code and tokenizer only")
    parser.add_argument("--no-warmup", action="store_true", help="skip the [SEG] warm-up of the tiny LLM")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.family in ("qwen2_5_vl", "qwen3_vl"):
        from .tiny_qwen_vl import write_qwen_vl_checkpoint

        path = write_qwen_vl_checkpoint(args.out, family=args.family, seed=args.seed, preset=args.preset,
                                        weights=not args.no_weights, warmup=not args.no_warmup)
        print(f"wrote {args.preset} Sa2VA checkpoint ({args.family} family) to {path} ({time.perf_counter() - t0:.1f} s)")
        return 0
    path = write_tiny_checkpoint(args.out, seed=args.seed, preset=args.preset, weights=not args.no_weights,
                                 warmup=not args.no_warmup, family=args.family)
    family = args.family or preset_family(args.preset)
    print(f"wrote {args.preset} Sa2VA checkpoint ({family} family) to {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
