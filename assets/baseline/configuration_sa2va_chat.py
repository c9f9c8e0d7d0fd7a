"""Configuration of the sa2va-dpo tiny Sa2VA checkpoint (remote code, self-contained).

Mirrors the release's `Sa2VAChatConfig`: `vision_config` (InternViT, here transformers'
`InternVLVisionConfig`), `llm_config` (dispatched on `architectures[0]`: Qwen2 or InternLM2), template and tiling
fields. Adds `sam2_config`, a plain dict with the SAM2 sizes (the release hard-codes Hiera-L).
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

from .configuration_internlm2 import InternLM2Config

# llm_config.architectures[0] -> its config class (the release dispatches the same way)
LLM_CONFIG_CLASSES = {"Qwen2ForCausalLM": Qwen2Config, "InternLM2ForCausalLM": InternLM2Config}
SUPPORTED_LLM_ARCHITECTURES = tuple(LLM_CONFIG_CLASSES)


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, PretrainedConfig):
        out = cfg.to_dict()
    else:
        out = copy.deepcopy(dict(cfg))
    out.pop("transformers_version", None)
    return out


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_chat"
    is_composition = True

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        sam2_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        pad2square=False,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        vision = _as_dict(vision_config)
        vision.pop("model_type", None)
        llm = _as_dict(llm_config)
        llm.pop("model_type", None)
        architectures = llm.get("architectures") or ["Qwen2ForCausalLM"]
        llm["architectures"] = list(architectures)
        arch = architectures[0]
        if arch not in SUPPORTED_LLM_ARCHITECTURES:
            raise ValueError(
                f"llm_config.architectures[0] is {arch!r}; this tiny Sa2VA remote code supports only "
                f"{', '.join(SUPPORTED_LLM_ARCHITECTURES)}"
            )
        self.vision_config = InternVLVisionConfig(**vision)
        self.llm_config = LLM_CONFIG_CLASSES[arch](**llm)
        self.sam2_config = copy.deepcopy(dict(sam2_config or {}))
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = _as_dict(self.vision_config)
        output["llm_config"] = _as_dict(self.llm_config)
        output["sam2_config"] = copy.deepcopy(self.sam2_config)
        output["model_type"] = self.__class__.model_type
        return output

    def to_diff_dict(self):
        # the nested configs are always written in full, like the release does
        output = super().to_diff_dict()
        output["vision_config"] = _as_dict(self.vision_config)
        output["llm_config"] = _as_dict(self.llm_config)
        output["sam2_config"] = copy.deepcopy(self.sam2_config)
        return output
