"""The Qwen-VL family: `Sa2VAChatModelQwen` (Sa2VA "codebase v2": Sa2VA-Qwen2_5-VL-3B/7B,
Sa2VA-Qwen3-VL-4B). Children `model` (transformers' own Qwen2.5-VL / Qwen3-VL for conditional
generation), `grounding_encoder`, `text_hidden_fcs`.

The [SEG] forward here mirrors what the release's predict_forward feeds `model.generate`:
  image     qwen_vl_utils.process_vision_info (as predict_forward calls it), then the checkpoint's
            image processor with the model's min_pixels / max_pixels -> patches + (t, h, w) grid;
  prompt    the processor's chat template with one image and the text, `<|image_pad|>` repeated
            once per merged patch, then the teacher-forced answer;
  frozen    the vision tower's merged image embeddings (and Qwen3-VL's deepstack features); when
            the vision merger trains (`train_modules.mlp1`), the tower's output before the merger:
            one row per merged patch (its spatial_merge_size**2 patch features side by side), in
            image order, so each row lines up with one `<|image_pad|>` and one deepstack row;
  LLM       input embeddings with the image embeddings scattered at `<|image_pad|>`, M-RoPE
            position ids from the grid through the model's own `get_rope_index`, the text model
            alone (no vocabulary logits).
`train_modules.mlp1` means the vision merger (`model.model.visual.merger`) for this family;
Qwen3-VL's deepstack mergers stay frozen (their outputs are cached).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import UserError
from . import Family, get_module, swapped

VLM_PATH = "model.model"  # Qwen2_5_VLModel / Qwen3VLModel inside Sa2VAChatModelQwen


class _MergerInput(nn.Module):
    """Stands in for the vision merger while the frozen features are computed: it returns the
    merger's input with each merged patch's `unit` patch rows side by side (the merger itself
    normalises each patch row, then reads `unit` consecutive rows as one). The vision tower then
    puts these rows in image order as it does the merger's output (Qwen2.5-VL undoes its
    window-attention order after the merger)."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.unit * x.shape[-1])


class QwenVLFamily(Family):
    name = "qwen_vl"
    label = "Qwen2.5-VL / Qwen3-VL"
    config_classes = ("Sa2VAChatConfigQwen",)
    llm_path = VLM_PATH + ".language_model"
    vision_path = VLM_PATH + ".visual"
    projector_path = VLM_PATH + ".visual.merger"  # trained by train_modules.mlp1

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        ref = (config.get("auto_map") or {}).get("AutoConfig", "")
        if ref:
            return ref.rsplit(".", 1)[-1] in cls.config_classes
        return "text_config" in config and "image_token_id" in config and "llm_config" not in config

    def check_config(self, folder: Path, config: dict[str, Any]) -> None:
        for key in ("text_config", "vision_config", "image_token_id"):
            if key not in config:
                raise UserError(f"{folder / 'config.json'} has no {key!r} field")
        if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
            raise UserError(f"model folder {folder} has no preprocessor_config.json: the Qwen-VL family "
                            "needs the checkpoint's processor (predict_forward takes processor=)")

    def facts(self, model: nn.Module, tokenizer: Any, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
        except Exception as err:  # noqa: BLE001 - a broken processor file: one line
            first = (str(err).strip().splitlines() or [""])[0]
            raise UserError(f"cannot load the processor of {folder}: {type(err).__name__}: {first}") from err
        image_token = getattr(processor, "image_token", "<|image_pad|>")
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_id != int(config["image_token_id"]):
            raise UserError(f"{folder / 'config.json'}: image_token_id is {config['image_token_id']} but the "
                            f"tokenizer gives {image_token} the id {image_id}")
        try:  # qwen_vl_utils prepares predict_forward's image; refuse now, not at the first image
            import qwen_vl_utils  # noqa: F401
        except ImportError as err:
            raise UserError(f"the Qwen-VL family needs the package qwen-vl-utils (its remote code imports "
                            f"qwen_vl_utils): pip install qwen-vl-utils ({err})") from err
        return {
            "img_context_token_id": image_id,
            "processor": processor,
            "min_pixels": int(model.min_pixels),
            "max_pixels": int(model.max_pixels),
        }

    def parameter_groups(self) -> dict[str, str]:
        return {
            "vision merger (mlp1)": VLM_PATH + ".visual.merger.",
            "vision (model.model.visual)": VLM_PATH + ".visual.",
            "LLM (LoRA)": VLM_PATH + ".language_model.",
            "lm_head": "model.lm_head.",
        }

    # ---- the forward

    def vision_input(self, sa2va: Any, image: np.ndarray) -> tuple[Tensor, Any]:
        from qwen_vl_utils import process_vision_info

        content = [{"type": "image", "image": Image.fromarray(image).convert("RGB")}]
        images, _ = process_vision_info([{"role": "user", "content": content}])
        out = sa2va.processor.image_processor(images=images, return_tensors="pt",
                                              min_pixels=sa2va.min_pixels, max_pixels=sa2va.max_pixels)
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"], grid

    def _merge(self, sa2va: Any) -> int:
        return int(get_module(sa2va.model, self.vision_path).spatial_merge_size)

    def encode_vision(self, sa2va: Any, pixels: Tensor, layouts: list[Any],
                      with_projector: bool) -> tuple[Tensor, list[int], list[Tensor]]:
        vlm = get_module(sa2va.model, VLM_PATH)
        grid = torch.tensor(layouts, dtype=torch.long, device=sa2va.device)
        unit = self._merge(sa2va) ** 2
        if with_projector:
            out = vlm.get_image_features(pixels.to(sa2va.device, sa2va.dtype), grid)
        else:  # the merger trains: the cache holds its input (see _MergerInput)
            with swapped(sa2va.model, self.projector_path, _MergerInput(unit)):
                out = vlm.get_image_features(pixels.to(sa2va.device, sa2va.dtype), grid)
        # transformers 5.x returns an output object; older releases a tuple (embeds[, deepstack])
        if hasattr(out, "pooler_output"):
            embeds, deep = out.pooler_output, getattr(out, "deepstack_features", None)
        elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
            embeds, deep = out
        else:
            embeds, deep = out, None
        cat = lambda x: torch.cat(list(x)) if isinstance(x, (list, tuple)) else x  # noqa: E731
        rows = [int(t * h * w) // unit for t, h, w in layouts]
        return cat(embeds), rows, [cat(d) for d in (deep or [])]

    def project(self, sa2va: Any, vit: Tensor) -> Tensor:
        merger = self.projector(sa2va.model)
        rows = vit.reshape(-1, vit.shape[-1] // self._merge(sa2va) ** 2)  # one patch per row again
        return merger(rows.to(next(merger.parameters()).dtype))

    def prompt_ids(self, sa2va: Any, layout: Any, question: str, answer: str) -> list[int]:
        processor = sa2va.processor
        text = f"<image>\n{question}".replace("<image>", "")  # predict_forward strips <image> from the text
        messages = [{"role": "user", "content": [{"type": "image", "image": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_token = getattr(processor, "image_token", "<|image_pad|>")
        if prompt.count(image_token) != 1:
            raise UserError(f"the chat template of {sa2va.path} does not place one {image_token} for an image")
        t, h, w = layout
        count = t * h * w // self._merge(sa2va) ** 2
        ids = sa2va.tokenizer(prompt.replace(image_token, image_token * count) + answer,
                              add_special_tokens=False)["input_ids"]
        if ids.count(sa2va.img_context_token_id) != count:
            raise UserError(f"the tokenizer of {sa2va.path} splits {image_token}: not a Qwen-VL tokenizer")
        return ids

    def llm_hidden(self, sa2va: Any, input_ids: Tensor, attention: Tensor, image_embeds: Tensor,
                   features: Any) -> Tensor:
        vlm = get_module(sa2va.model, VLM_PATH)
        lm = sa2va.llm
        embeds = lm.get_input_embeddings()(input_ids)
        embeds = self.scatter_images(embeds, input_ids, sa2va.img_context_token_id, image_embeds)
        grid = torch.tensor([features.layout(i) for i in range(input_ids.shape[0])], dtype=torch.long,
                            device=input_ids.device)
        kwargs: dict[str, Any] = {}
        if features.extra:  # Qwen3-VL: deepstack features join the first decoder layers at the image tokens
            kwargs = {"visual_pos_masks": input_ids == sa2va.img_context_token_id,
                      "deepstack_visual_embeds": [x.to(embeds.dtype) for x in features.extra]}
        out = lm(inputs_embeds=embeds, attention_mask=attention, use_cache=False,
                 position_ids=rope_positions(vlm, input_ids, grid, attention, sa2va.img_context_token_id), **kwargs)
        return out.last_hidden_state

    def generate_kwargs(self, sa2va: Any) -> dict[str, Any]:
        return {"tokenizer": sa2va.tokenizer, "processor": sa2va.processor}


def rope_positions(vlm: nn.Module, input_ids: Tensor, grid: Tensor, attention: Tensor, image_token_id: int) -> Tensor:
    """M-RoPE position ids (3, B, L) from the model's own get_rope_index (its signature changed
    within transformers 5.x: newer versions take the token types instead of finding the
    vision-start tokens)."""
    params = inspect.signature(vlm.get_rope_index).parameters
    kwargs: dict[str, Any] = {"image_grid_thw": grid, "attention_mask": attention}
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = (input_ids == image_token_id).int()  # text 0, image 1
    positions, _ = vlm.get_rope_index(input_ids, **kwargs)
    return positions
