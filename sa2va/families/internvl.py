"""The InternVL family: `Sa2VAChatModel` (Sa2VA-1B/4B with Qwen2 LLMs, InternVL3-2B/8B/14B,
8B/26B with InternLM2). Children `vision_model`, `language_model`, `mlp1`, `grounding_encoder`,
`text_hidden_fcs`; 448 px dynamic tiles, `<img><IMG_CONTEXT>...</img>`, a named text template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..errors import UserError
from ..preprocess import vit_tiles
from . import Family, swapped

# The chat templates the release ships (the name is read from config.json at run time).
TEMPLATES: dict[str, str] = {
    "qwen_chat": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "internlm2_chat": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "phi3_chat": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
}
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class InternVLFamily(Family):
    name = "internvl"
    label = "InternVL + Qwen2 / InternLM2 LLM"
    config_classes = ("Sa2VAChatConfig",)
    llm_path = "language_model"
    vision_path = "vision_model"
    projector_path = "mlp1"

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        ref = (config.get("auto_map") or {}).get("AutoConfig", "")
        return ref.rsplit(".", 1)[-1] in cls.config_classes or "llm_config" in config

    def check_config(self, folder: Path, config: dict[str, Any]) -> None:
        for key in ("template", "llm_config", "vision_config"):
            if key not in config:
                raise UserError(f"{folder / 'config.json'} has no {key!r} field")

    def facts(self, model: nn.Module, tokenizer: Any, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
        template_name = config["template"]
        if template_name not in TEMPLATES:
            raise UserError(f"{folder / 'config.json'}: unknown template {template_name!r} "
                            f"(known: {', '.join(TEMPLATES)})")
        ids = {}
        for token in (IMG_CONTEXT, IMG_START, IMG_END):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise UserError(f"the tokenizer of {folder} has no {token} token: not a Sa2VA tokenizer")
            ids[token] = tid
        model.img_context_token_id = ids[IMG_CONTEXT]  # the release starts with None
        vision = config["vision_config"]
        return {
            "template": TEMPLATES[template_name],
            "img_context_token_id": ids[IMG_CONTEXT],
            "num_image_token": int(model.num_image_token),
            "vit_size": int(config.get("force_image_size") or vision.get("image_size")),
            "min_tiles": int(config.get("min_dynamic_patch", 1)),
            "max_tiles": int(config.get("max_dynamic_patch", 12)),
            "use_thumbnail": bool(config.get("use_thumbnail", True)),
            "dynamic_tiles": bool(config.get("dynamic_image_size", True)),
        }

    def parameter_groups(self) -> dict[str, str]:
        return {
            "vision_model": "vision_model.",
            "mlp1": "mlp1.",
            "language_model (LoRA)": "language_model.",
        }

    def vision_input(self, sa2va: Any, image: np.ndarray) -> tuple[Tensor, Any]:
        tiles = vit_tiles(image, sa2va.vit_size, sa2va.min_tiles,
                          sa2va.max_tiles if sa2va.dynamic_tiles else 1, sa2va.use_thumbnail)
        return tiles, int(tiles.shape[0])  # layout = the tile count

    def encode_vision(self, sa2va: Any, pixels: Tensor, layouts: list[Any],
                      with_projector: bool) -> tuple[Tensor, list[int], list[Tensor]]:
        model = sa2va.model
        pixels = pixels.to(sa2va.device, sa2va.dtype)
        if with_projector:
            vit = model.extract_feature(pixels)
        else:  # mlp1 trains: the cache holds what goes into it
            with swapped(model, self.projector_path, nn.Identity()):
                vit = model.extract_feature(pixels)
        return vit, [int(n) for n in layouts], []  # one row of `vit` per tile

    def prompt_ids(self, sa2va: Any, layout: Any, question: str, answer: str) -> list[int]:
        tiles = int(layout)
        image_text = IMG_START + IMG_CONTEXT * (sa2va.num_image_token * tiles) + IMG_END
        text = sa2va.template.format(input=f"<image>\n{question}").replace("<image>", image_text) + answer
        ids = sa2va.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(sa2va.img_context_token_id) != sa2va.num_image_token * tiles:
            raise UserError("the tokenizer split <IMG_CONTEXT> into several tokens: not a Sa2VA tokenizer")
        return ids

    def llm_hidden(self, sa2va: Any, input_ids: Tensor, attention: Tensor, image_embeds: Tensor,
                   features: Any) -> Tensor:
        lm = sa2va.llm
        embeds = lm.get_input_embeddings()(input_ids)
        embeds = self.scatter_images(embeds, input_ids, sa2va.img_context_token_id,
                                     image_embeds.reshape(-1, image_embeds.shape[-1]))
        # The decoder alone: the [SEG] state needs no vocabulary logits and no KV cache.
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        return decoder(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
