"""The Sa2VA release's compatibility fixes for transformers 5.x, in one place.

The release's remote code was written for transformers 4.42-4.57. Each function here repairs one
measured breakage (numbered as in the project's notes on the release) on the *loaded classes or
objects*, never by editing the user's files, and does nothing where the code needs no repair.
`sa2va.model.load_sa2va` calls them around `AutoModel.from_pretrained`.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError


def install_import_shims() -> None:
    """Known breakage 1: the release's phi3 module imports transformers.modeling_attn_mask_utils,
    removed in transformers 5.10; modeling_sa2va_chat imports it for every size. Give the import
    a stand-in whose functions refuse with a message (only Phi3-based sizes would call them)."""
    name = "transformers.modeling_attn_mask_utils"
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    shim = types.ModuleType(name)

    def _refuse(*_args: Any, **_kwargs: Any) -> None:
        raise UserError("this Sa2VA size uses a Phi3 LLM whose remote code needs "
                        "transformers.modeling_attn_mask_utils (removed in transformers 5.10): "
                        "use transformers<5.10 for it")

    for fn in ("_prepare_4d_causal_attention_mask", "_prepare_4d_causal_attention_mask_for_sdpa",
               "_prepare_4d_attention_mask", "_prepare_4d_attention_mask_for_sdpa"):
        setattr(shim, fn, _refuse)

    class AttentionMaskConverter:  # referenced by name only
        def __init__(self, *_a: Any, **_k: Any) -> None:
            _refuse()

    shim.AttentionMaskConverter = AttentionMaskConverter
    sys.modules[name] = shim


def ensure_post_init(folder: Path, auto_ref: str) -> None:
    """Known breakage 2: Sa2VAChatModel.__init__ never calls post_init(), which transformers 5
    needs before from_pretrained. Wrap __init__ of the loaded class when its source lacks it."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module(auto_ref, str(folder))
    if getattr(cls, "_sa2va_dpo_post_init", False):
        return
    source = (folder / f"{auto_ref.split('--')[-1].rsplit('.', 1)[0]}.py").read_text()
    if "self.post_init()" in source:
        return
    original_init = cls.__init__

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.post_init()

    cls.__init__ = __init__
    cls._sa2va_dpo_post_init = True


def fix_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Known breakage 4: after v5 loading, SAM2 memory attention's `freqs_cis` stay on the meta
    device (non-persistent attributes). Recompute them with the module's own compute_cis."""
    for module in model.modules():
        freqs = getattr(module, "freqs_cis", None)
        if isinstance(freqs, Tensor) and freqs.is_meta and callable(getattr(module, "compute_cis", None)):
            side = math.isqrt(freqs.shape[0])
            module.freqs_cis = module.compute_cis(end_x=side, end_y=side).to(device)
