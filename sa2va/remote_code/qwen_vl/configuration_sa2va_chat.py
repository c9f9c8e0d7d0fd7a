"""Config of the sa2va-dpo tiny Sa2VA checkpoint, Qwen-VL family (remote code).

Like the release's `Sa2VAChatConfigQwen` (Sa2VA "codebase v2"): transformers' own Qwen-VL config
with `model_type` "sa2va_chat" and a `template` argument. sa2va-dpo writes this file for
Qwen2.5-VL and, with the class names swapped, for Qwen3-VL. Extra keys (`sam2_config`,
`min_pixels`, `max_pixels`) stay on the config as plain attributes.
"""

from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig


class Sa2VAChatConfigQwen(Qwen2_5_VLConfig):
    model_type = "sa2va_chat"

    def __init__(self, template=None, **kwargs):
        super().__init__(**kwargs)
        self.template = template
