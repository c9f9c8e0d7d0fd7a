"""Write a Sa2VA-format checkpoint folder of the Qwen-VL family (Sa2VA "codebase v2").

    python -m sa2va.tiny --out DIR --family qwen2_5_vl|qwen3_vl [--seed N] [--preset tiny|7b|4b] [--no-weights]

The folder looks like the release's Sa2VA-Qwen2_5-VL / Sa2VA-Qwen3-VL checkpoints: config.json
(model_type sa2va_chat, auto_map to `configuration_sa2va_chat.Sa2VAChatConfigQwen` and
`modeling_sa2va_qwen.Sa2VAChatModelQwen`), the remote code (from sa2va/remote_code/qwen_vl/ with
the family's class names, plus the shared sam2.py), a Qwen2 tokenizer with `[SEG] <p> </p> <vp>
</vp>`, the processor files (preprocessor_config.json, the chat template) and, for the tiny
preset, model.safetensors. The model is transformers' own Qwen2.5-VL / Qwen3-VL; the tiny one is
warmed up so that greedy `predict_forward` answers a segmentation prompt with "It is [SEG]."
Presets other than tiny are config-only (real shapes, for benchmarks with random weights).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .fileio import atomic_dir
from .remote_code.sam2 import HIERA_L_SAM2_CONFIG

REMOTE_DIR = Path(__file__).resolve().parent / "remote_code"
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
# What differs between the two families' files: class and module names.
CLASS_NAMES = {
    "qwen2_5_vl": {},
    "qwen3_vl": {
        "qwen2_5_vl.configuration_qwen2_5_vl": "qwen3_vl.configuration_qwen3_vl",
        "Qwen2_5_VLConfig": "Qwen3VLConfig",
        "Qwen2_5_VLForConditionalGeneration": "Qwen3VLForConditionalGeneration",
        "Qwen2_5_VLDecoderLayer": "Qwen3VLTextDecoderLayer",
        "Qwen2.5-VL and, with the class names\nswapped, for Qwen3-VL": "Qwen3-VL (and, with the class names\nswapped, for Qwen2.5-VL)",
    },
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
VOCAB_SIZE = 1024
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}

# A chat-ML template with Qwen-VL's vision markers (written for this project). Qwen2.5-VL's
# default system message is kept for that family; Qwen3-VL has none.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def _tiny_sam2() -> dict:
    from .tiny import _TINY_SAM2

    return copy.deepcopy(_TINY_SAM2)


def _text(hidden, layers, heads, kv, inter, vocab, theta, section, head_dim=None, interleaved=False) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": section}
    if interleaved:
        rope["mrope_interleaved"] = True
    cfg = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "max_position_embeddings": 128000, "rope_scaling": rope}
    if head_dim:
        cfg["head_dim"] = head_dim
    return cfg


PRESETS: dict = {
    "qwen2_5_vl": {
        "tiny": {
            "text": _text(64, 2, 4, 2, 128, VOCAB_SIZE, 1e6, [2, 3, 3]),
            "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1], "out_hidden_size": 64, "hidden_act": "silu"},
            "tie": False, "pixels": (16 * 28 * 28, 64 * 28 * 28), "sam2": "tiny",
        },
        "7b": {  # Sa2VA-Qwen2_5-VL-7B: Qwen2.5-VL-7B + SAM2 Hiera-L
            "text": _text(3584, 28, 28, 4, 18944, 152064, 1e6, [16, 24, 24]),
            "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 3584, "hidden_act": "silu"},
            "tie": False, "pixels": None, "sam2": "hiera_l",
        },
    },
    "qwen3_vl": {
        "tiny": {
            "text": _text(64, 2, 4, 2, 128, VOCAB_SIZE, 5e6, [2, 3, 3], head_dim=16, interleaved=True),
            "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [0],
                       "hidden_act": "gelu_pytorch_tanh"},
            "tie": False, "pixels": (16 * 32 * 32, 64 * 32 * 32), "sam2": "tiny",
        },
        "4b": {  # Sa2VA-Qwen3-VL-4B: Qwen3-VL-4B + SAM2 Hiera-L
            "text": _text(2560, 36, 32, 8, 9728, 151936, 5e6, [24, 20, 20], head_dim=128, interleaved=True),
            "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                       "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "out_hidden_size": 2560, "num_position_embeddings": 2304,
                       "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh"},
            "tie": True, "pixels": None, "sam2": "hiera_l",
        },
    },
}


def preset_config_dict(family: str, preset: str, token_ids: dict[str, int] | None = None) -> dict:
    """config.json of a Qwen-VL-family preset. token_ids: the folder tokenizer's ids of the vision
    tokens and <|im_end|> / <|endoftext|> (None: Qwen's own ids, for a config on its own)."""
    if family not in PRESETS:
        raise UserError(f"unknown family {family!r} (choose one of: qwen2, internlm2, {', '.join(FAMILIES)})")
    if preset not in PRESETS[family]:
        raise UserError(f"unknown preset {preset!r} for family {family} (choose one of: {', '.join(PRESETS[family])})")
    p = PRESETS[family][preset]
    ids = token_ids or {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|vision_start|>": 151652,
                        "<|vision_end|>": 151653, "<|im_end|>": 151645, "<|endoftext|>": 151643}
    text = dict(copy.deepcopy(p["text"]), eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=p["tie"])
    config = {
        "architectures": ["Sa2VAChatModelQwen"],
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
            "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
            "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
        },
        "model_type": "sa2va_chat",
        "template": "qwen_chat",
        "text_config": text,
        "vision_config": copy.deepcopy(p["vision"]),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": p["tie"],
        "torch_dtype": "float32" if preset == "tiny" else "bfloat16",
        "sam2_config": _tiny_sam2() if p["sam2"] == "tiny" else copy.deepcopy(HIERA_L_SAM2_CONFIG),
    }
    if p["pixels"]:
        config["min_pixels"], config["max_pixels"] = p["pixels"]
    return config


# ----------------------------------------------------------------------------- files


def _remote_code(family: str, name: str) -> str:
    text = (REMOTE_DIR / "qwen_vl" / name).read_text()
    for old, new in CLASS_NAMES[family].items():
        text = text.replace(old, new)
    return text


def _classes(folder: Path):
    """The remote-code classes as written into `folder` (imported like transformers would)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cfg = get_class_from_dynamic_module("configuration_sa2va_chat.Sa2VAChatConfigQwen", str(folder))
    model = get_class_from_dynamic_module("modeling_sa2va_qwen.Sa2VAChatModelQwen", str(folder))
    return cfg, model


def _write_tokenizer_and_processor(folder: Path, family: str) -> dict[str, int]:
    """Tokenizer and processor files; returns the special tokens' ids (and "vocab": the size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from .tiny import _CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    tokenizer_config = {
        "added_tokens_decoder": added, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 32768,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "padding_side": "right",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    patch = PATCH[family]
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                            min_pixels=4 * (2 * patch) ** 2, max_pixels=16384 * (2 * patch) ** 2)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(patch_size=patch),
                                        chat_template=CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", "true"))
    else:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=Qwen3VLVideoProcessor(patch_size=patch),
                                     chat_template=CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", "false"))
    processor.save_pretrained(str(folder))
    # The release's layout: the image processor's preprocessor_config.json naming the processor
    # class (transformers 5 writes processor_config.json instead; both load with AutoProcessor).
    saved = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").unlink()
    preprocessor = dict(saved["image_processor"], processor_class=saved["processor_class"])
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    ids["vocab"] = tok.get_vocab_size()
    return ids


# ----------------------------------------------------------------------------- warm-up


def _warmup(model, processor, seed: int, min_steps: int = 40, max_steps: int = 400, batch: int = 4) -> dict:
    """Teacher-forced CE on 'It is [SEG].<|im_end|>' (the LLM trains, the vision tower too),
    through the processor exactly as predict_forward prepares its input."""
    from qwen_vl_utils import process_vision_info

    from .tiny import WARMUP_ANSWER, WARMUP_PROMPTS, _random_image

    from .compat import fix_sam2_device

    fix_sam2_device(model)  # the check below runs predict_forward, whose sam2.py path is CUDA-only
    rng = np.random.default_rng(seed + 12345)
    vlm = model.model
    model.requires_grad_(False)
    vlm.requires_grad_(True)
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    tok = processor.tokenizer
    answer_ids = tok(WARMUP_ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]

    def example(r):
        image = _random_image(r)
        question = WARMUP_PROMPTS[int(r.integers(0, len(WARMUP_PROMPTS)))]
        text = ("<image>\n" + question).replace("<image>", "")  # what predict_forward sends
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = process_vision_info(messages)
        return image, question, prompt, images

    def passes() -> bool:
        model.eval()
        with torch.no_grad():
            for i in range(4):
                image, question, _, _ = example(np.random.default_rng(seed + 999 + i))
                out = model.predict_forward(image=image, text="<image>\n" + question, processor=processor)
                if out["prediction"] != WARMUP_ANSWER + "<|im_end|>" or len(out["prediction_masks"]) != 1:
                    return False
        return True

    step, loss_value, t0 = 0, float("nan"), time.perf_counter()
    while step < max_steps:
        vlm.train()
        items = [example(rng) for _ in range(batch)]
        inputs = processor(text=[p + WARMUP_ANSWER + "<|im_end|>" for _, _, p, _ in items],
                           images=[im for *_, ims in items for im in ims], padding=True, return_tensors="pt",
                           min_pixels=model.min_pixels, max_pixels=model.max_pixels)
        labels = torch.full_like(inputs["input_ids"], -100)
        for i in range(batch):
            n = int(inputs["attention_mask"][i].sum())
            labels[i, n - len(answer_ids):n] = inputs["input_ids"][i, n - len(answer_ids):n]
        out = vlm(**inputs, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        loss_value = out.loss.item()
        if step >= min_steps and step % 20 == 0 and loss_value < 0.05 and passes():
            break
    model.requires_grad_(True)
    model.eval()
    return {"steps": step, "final_loss": loss_value, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- writer


def write_qwen_vl_checkpoint(out: str | Path, family: str = "qwen2_5_vl", seed: int = 0, preset: str = "tiny",
                             weights: bool = True, warmup: bool = True) -> Path:
    """Write a Qwen-VL-family Sa2VA folder at `out` (refused if it exists and is not empty)."""
    preset_config_dict(family, preset)  # validates family and preset
    if weights and preset != "tiny":
        raise UserError(f"preset {preset!r} is only written with --no-weights (random weights of real "
                        "sizes are built with AutoModel.from_config on the machine that uses them)")
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"parent folder of --out does not exist: {out.parent}")
    with atomic_dir(out) as tmp:
        for name in ("configuration_sa2va_chat.py", "modeling_sa2va_qwen.py"):
            (tmp / name).write_text(_remote_code(family, name))
        (tmp / "sam2.py").write_text((REMOTE_DIR / "sam2.py").read_text())
        ids = _write_tokenizer_and_processor(tmp, family)
        config_dict = preset_config_dict(family, preset, ids)  # the folder's own tokenizer ids, every preset
        if preset == "tiny":  # the embedding is sized to the tokenizer (rounded up)
            config_dict["text_config"]["vocab_size"] = int(-(-ids["vocab"] // 64) * 64)
        generation = {"do_sample": False, "eos_token_id": [config_dict["eos_token_id"], ids["<|endoftext|>"]],
                      "pad_token_id": ids["<|endoftext|>"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if weights:
            from safetensors.torch import save_file
            from transformers import AutoProcessor

            config_cls, model_cls = _classes(tmp)
            kwargs = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map", "torch_dtype")}
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1)  # deterministic kernels
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = model_cls(config_cls(**kwargs)).float().eval()
                    if warmup:
                        _warmup(model, AutoProcessor.from_pretrained(str(tmp)), seed)
            finally:
                torch.set_num_threads(threads)
            state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # config.json last: before it exists, the tokenizer and processor read the folder alone
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return out
