"""The Sa2VA release's compatibility fixes for transformers 5.x, in one place.

The release's remote code was written for transformers 4.42-4.57. Each function here repairs one
measured breakage (numbered as in the project's notes on the release) on the *loaded classes or
objects*, never by editing the user's files, and does nothing where the code needs no repair.
`sa2va.model.load_sa2va` calls them around `AutoModel.from_pretrained`.
"""

from __future__ import annotations

import importlib
import json
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
    if _init_calls_post_init(source, cls.__name__):
        return
    original_init = cls.__init__

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.post_init()

    cls.__init__ = __init__
    cls._sa2va_dpo_post_init = True


def _init_calls_post_init(source: str, class_name: str) -> bool:
    """Whether `class_name.__init__` in `source` calls self.post_init() (read from the syntax tree,
    so a comment or docstring that mentions it does not count)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return "self.post_init()" in source
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            inits = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"]
            return any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "post_init"
                       for f in inits for c in ast.walk(f))
    return "self.post_init()" in source  # class not found in this file: the old textual rule


def fix_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Known breakage 4: after v5 loading, SAM2 memory attention's `freqs_cis` stay on the meta
    device (non-persistent attributes). Recompute them with the module's own compute_cis."""
    for module in model.modules():
        freqs = getattr(module, "freqs_cis", None)
        if isinstance(freqs, Tensor) and freqs.is_meta and callable(getattr(module, "compute_cis", None)):
            side = math.isqrt(freqs.shape[0])
            module.freqs_cis = module.compute_cis(end_x=side, end_y=side).to(device)


# --------------------------------------------------------------------------- the 8B/26B family (InternLM2)
# Breakages 5-9 of the project's notes, measured with the release's InternLM2 remote code.

# LLM architectures the Sa2VA releases dispatch on (llm_config.architectures[0]).
KNOWN_LLM_ARCHITECTURES = ("Qwen2ForCausalLM", "InternLM2ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM")


def check_llm_architecture(folder: Path, config: dict) -> None:
    """Refuse, in one line, an llm_config whose architecture no Sa2VA release has."""
    llm = config.get("llm_config")
    if not isinstance(llm, dict):
        return  # the Qwen-VL releases carry no llm_config
    arch = (llm.get("architectures") or [None])[0]
    if arch not in KNOWN_LLM_ARCHITECTURES:
        raise UserError(f"{folder / 'config.json'}: llm_config.architectures[0] is {arch!r}, an LLM family "
                        f"the suite does not know (known: {', '.join(KNOWN_LLM_ARCHITECTURES)})")


def _require_sentencepiece(folder: Path, module: str) -> None:
    """Breakage 5: the InternLM2 tokenizer imports sentencepiece; say so in one line."""
    source = folder / f"{module}.py"
    if not source.is_file() or "sentencepiece" not in source.read_text(errors="replace"):
        return
    try:
        importlib.import_module("sentencepiece")
    except ImportError:
        raise UserError(f"the tokenizer of {folder} ({source.name}) needs the sentencepiece package, which is "
                        "not installed: pip install sentencepiece (it is in requirements.txt)") from None


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    """Breakage 6: transformers 5.x ignores use_fast=False and converts tokenizer.model into the
    remote *fast* class, whose ids differ from the release's (every added token shifted). When
    tokenizer_config.json names a remote slow class as tokenizer_class, build that class itself."""
    from transformers import AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    slow_ref = None
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            tok_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{config_file} is not valid JSON: {err}") from err
        refs = (tok_config.get("auto_map") or {}).get("AutoTokenizer")
        named = tok_config.get("tokenizer_class") or ""
        if isinstance(refs, (list, tuple)) and refs and refs[0] and not named.endswith("Fast") \
                and refs[0].rsplit(".", 1)[-1] == named:
            slow_ref = refs[0]
    if slow_ref is None:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    _require_sentencepiece(folder, slow_ref.split("--")[-1].rsplit(".", 1)[0])
    cls = get_class_from_dynamic_module(slow_ref, str(folder))
    return cls.from_pretrained(str(folder))


def repair_rope_scaling(hf_config: Any) -> None:
    """Breakage 7: the InternLM2 remote code reads llm_config.rope_scaling['type'], but transformers
    5.x turns `rope_scaling: null` into {'rope_type': 'default', ...} (no 'type'): KeyError at load.
    Give remote LLM configs back the release's form (None, or {'type', 'factor'}); transformers'
    own config classes read rope_parameters and are left alone."""
    llm = getattr(hf_config, "llm_config", None)
    if llm is None or type(llm).__module__.startswith("transformers."):
        return
    scaling = getattr(llm, "rope_scaling", None)
    if not isinstance(scaling, dict) or "type" in scaling:
        return
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        llm.rope_scaling = None
    elif "factor" in scaling:
        llm.rope_scaling = {"type": kind, "factor": scaling["factor"]}


def is_release_rotary(module: nn.Module) -> bool:
    """A rotary embedding in the Llama-4.3x style of the release's remote code: dim, base,
    max_position_embeddings, an inv_freq buffer and a _set_cos_sin_cache method."""
    return (isinstance(getattr(module, "inv_freq", None), Tensor)
            and all(hasattr(module, name) for name in ("dim", "base", "max_position_embeddings"))
            and callable(getattr(module, "_set_cos_sin_cache", None)))


def restore_rotary_buffers(model: nn.Module) -> int:
    """Breakage 8: transformers 5.x leaves the non-persistent rotary buffers (inv_freq, cos_cached,
    sin_cached) of remote-code rotary embeddings uninitialised: RoPE is garbage, silently. Recompute
    them exactly as the module's __init__ does: inv_freq from base and dim, then the cos/sin tables
    with the module's own _set_cos_sin_cache. An inv_freq that the checkpoint carries (a persistent
    buffer) is kept as loaded, for the self-check to judge. Returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        if not is_release_rotary(module):
            continue
        device = module.inv_freq.device
        cache_dtype = module.cos_cached.dtype if isinstance(getattr(module, "cos_cached", None), Tensor) \
            else torch.float32
        if "inv_freq" in module._non_persistent_buffers_set:
            inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2).float().to(device) / module.dim))
            module.register_buffer("inv_freq", inv_freq, persistent=False)
        module._set_cos_sin_cache(seq_len=module.max_position_embeddings, device=device, dtype=cache_dtype)
        restored += 1
    return restored


def _legacy_cache(past: Any) -> Any:
    """A transformers Cache -> the release's tuple of (key, value) per layer (None when empty)."""
    from transformers.cache_utils import Cache

    if not isinstance(past, Cache):
        return past
    if past.get_seq_length() == 0:
        return None
    if hasattr(past, "layers"):
        return tuple((layer.keys, layer.values) for layer in past.layers)
    return tuple(zip(past.key_cache, past.value_cache))


def _with_generation(base: type) -> type:
    """`base` + GenerationMixin, bridging transformers' Cache objects and the release's tuples:
    generate hands the model a Cache; the release's code reads and returns tuples."""
    import functools
    import inspect

    from transformers import GenerationMixin
    from transformers.cache_utils import Cache

    accepted = set(inspect.signature(base.forward).parameters)

    # wraps: generate validates its kwargs against these signatures; show it the release's
    @functools.wraps(base.forward)
    def forward(self: nn.Module, *args: Any, cache: Any = None, past_key_values: Any = None, **kwargs: Any) -> Any:
        past = cache if cache is not None else past_key_values
        legacy = _legacy_cache(past)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        out = base.forward(self, *args, past_key_values=legacy, **kwargs)
        new = out.get("cache", out.get("past_key_values")) if isinstance(out, dict) else None
        if isinstance(past, Cache) and isinstance(new, tuple):
            seen = legacy[0][0].shape[2] if legacy else 0
            for idx, (key, value) in enumerate(new):
                past.update(key[:, :, seen:], value[:, :, seen:], idx)
            out["cache" if "cache" in type(out).__dataclass_fields__ else "past_key_values"] = past
        return out

    @functools.wraps(base.prepare_inputs_for_generation)
    def prepare_inputs_for_generation(self: nn.Module, input_ids: Tensor, cache: Any = None,
                                      past_key_values: Any = None, **kwargs: Any) -> dict:
        past = cache if cache is not None else past_key_values
        inputs = base.prepare_inputs_for_generation(self, input_ids, past_key_values=_legacy_cache(past), **kwargs)
        inputs["past_key_values"] = past  # the loop's own Cache; forward above converts it
        # transformers 5.x may pass position_ids for the whole sequence (4.x never did); the
        # release's rule only slices the ones it makes itself
        fed = inputs.get("inputs_embeds") if inputs.get("inputs_embeds") is not None else inputs.get("input_ids")
        positions = inputs.get("position_ids")
        if positions is not None and fed is not None and positions.shape[-1] != fed.shape[1]:
            inputs["position_ids"] = positions[..., -fed.shape[1]:]
        for key in ("output_hidden_states", "output_attentions", "return_dict"):
            if key in kwargs and key not in inputs:  # the release's rule drops them; generate needs them
                inputs[key] = kwargs[key]
        return inputs

    return type(base.__name__, (base, GenerationMixin), {
        "forward": forward, "prepare_inputs_for_generation": prepare_inputs_for_generation,
        "__module__": base.__module__, "_sa2va_dpo_generation": True,
    })


_GENERATIVE: dict[type, type] = {}


def enable_generation(model: nn.Module) -> int:
    """Breakage 9: InternLM2ForCausalLM does not inherit GenerationMixin, so since transformers 4.50
    it has no generate() and predict_forward fails. Every sub-model that defines the release's
    prepare_inputs_for_generation without GenerationMixin gets a class that has it. Returns the count."""
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel

    import inspect

    found = [m for m in model.modules() if isinstance(m, PreTrainedModel) and not isinstance(m, GenerationMixin)
             and callable(getattr(m, "prepare_inputs_for_generation", None))
             and "past_key_values" in inspect.signature(type(m).forward).parameters]  # a causal LM's forward
    for module in found:
        base = type(module)
        if base not in _GENERATIVE:
            _GENERATIVE[base] = _with_generation(base)
        module.__class__ = _GENERATIVE[base]
        if getattr(module, "generation_config", None) is None:
            module.generation_config = GenerationConfig.from_model_config(module.config)
    return len(found)


# Llama/Qwen2 projection names (the suite's default LoRA targets) -> the InternLM2 release's names.
INTERNLM2_LINEAR_NAMES = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo",
                          "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def lora_targets(llm: nn.Module, targets: Any) -> Any:
    """LoRA targets named the Llama way reach the InternLM2 layers (fused wqkv, wo, w1-w3) too,
    so one config trains every family. Names the LLM has are kept as they are."""
    if not isinstance(targets, (list, tuple)):
        return targets
    names = {name.rsplit(".", 1)[-1] for name, module in llm.named_modules() if isinstance(module, nn.Linear)}
    out: list[str] = []
    for target in targets:
        mapped = target if target in names else INTERNLM2_LINEAR_NAMES.get(target, target)
        if mapped not in out:
            out.append(mapped if mapped in names else target)
    return out


def fix_tied_weights_keys(model: nn.Module) -> int:
    """The release's InternLM2ForCausalLM declares `_tied_weights_keys = ['output.weight']` (a list,
    transformers 4.x); transformers 5.x reads a {target: source} dict and save_pretrained (the
    export) fails on the list. Give each such loaded object the dict form, the source being its
    input embedding. Returns the number of objects repaired."""
    from transformers import PreTrainedModel

    repaired = 0
    for module in model.modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if not isinstance(module, PreTrainedModel) or not isinstance(keys, (list, tuple)):
            continue
        embedding = module.get_input_embeddings()
        source = next((f"{name}.weight" for name, sub in module.named_modules() if sub is embedding), None)
        module._tied_weights_keys = {key: source for key in keys} if source else {}
        repaired += 1
    return repaired


def fix_sam2_device(model: nn.Module) -> None:
    """The release's sam2.py hard-codes CUDA in its video path (used by predict_forward):
    `init_state` records torch.device("cuda") as the state's devices and `_get_image_feature`
    moves each frame with `.cuda()`. Repair it on the loaded predictor object: before the
    release's `_get_image_feature` runs, point the state at the model's own device and fill the
    release's frame cache {frame_idx: (image, backbone_out)} there, so its `.cuda()` branch is
    never taken. The training path (forward_image, _forward_sam_heads) never calls these."""
    predictor = getattr(getattr(model, "grounding_encoder", None), "sam2_model", None)
    original = getattr(predictor, "_get_image_feature", None)
    if original is None or getattr(predictor, "_sa2va_dpo_device_fix", False):
        return

    def _get_image_feature(inference_state: dict, frame_idx: int, *args: Any, **kwargs: Any) -> Any:
        param = predictor.no_mem_embed
        for key in ("device", "storage_device"):
            if key in inference_state:
                inference_state[key] = param.device
        cache = inference_state.get("cached_features")
        if isinstance(cache, dict) and cache.get(frame_idx, (None, None))[1] is None:
            image = inference_state["images"][frame_idx].to(param.device, param.dtype).unsqueeze(0)
            inference_state["cached_features"] = {frame_idx: (image, predictor.forward_image(image))}
        return original(inference_state, frame_idx, *args, **kwargs)

    predictor._get_image_feature = _get_image_feature  # an instance attribute shadows the method
    predictor._sa2va_dpo_device_fix = True


# --------------------------------------------------------------------------- InternLM2 attention speed
# The release picks its attention class by llm_config.attn_implementation: "flash_attention_2"
# when the flash-attn package is installed, else "eager" (InternLM2Attention: the score matrix in
# float32 through softmax, keys and values repeated per head group). Without flash-attn, the same
# arithmetic runs through torch's scaled_dot_product_attention (fused kernels, no score matrix kept
# for backward). Set SA2VA_DPO_ATTENTION=eager to keep the release's eager path.
ATTENTION_ENV = "SA2VA_DPO_ATTENTION"
_SDPA_CLASSES: dict[type, type] = {}


def _is_release_eager_attention(module: nn.Module) -> bool:
    """The release's eager InternLM2Attention: fused wqkv laid out per key-value group, wo, a
    release-style rotary embedding, and apply_rotary_pos_emb beside it in its module."""
    return (type(module).__name__ == "InternLM2Attention"
            and isinstance(getattr(module, "wqkv", None), nn.Linear) and isinstance(getattr(module, "wo", None), nn.Linear)
            and all(isinstance(getattr(module, name, None), int)
                    for name in ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim"))
            and is_release_rotary(getattr(module, "rotary_emb", None) or nn.Module())
            and callable(getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)))


def _with_sdpa(base: type) -> type:
    """`base` whose forward computes the same attention with F.scaled_dot_product_attention."""
    apply_rotary_pos_emb = sys.modules[base.__module__].apply_rotary_pos_emb

    def forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_value: Any = None, output_attentions: bool = False,
                use_cache: bool = False, **kwargs: Any) -> tuple[Tensor, None, Any]:
        if output_attentions:  # only the eager path has the weights to return
            return base.forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_value=past_key_value, output_attentions=True, use_cache=use_cache, **kwargs)
        bsz, q_len, _ = hidden_states.shape
        groups, kv_heads, head_dim = self.num_key_value_groups, self.num_key_value_heads, self.head_dim
        # per key-value group: its query heads, then its key, then its value (the release's layout)
        qkv = self.wqkv(hidden_states).view(bsz, q_len, kv_heads, groups + 2, head_dim)
        query = qkv[..., :groups, :].reshape(bsz, q_len, self.num_heads, head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        past_len = past_key_value[0].shape[-2] if past_key_value is not None else 0
        cos, sin = self.rotary_emb(value, seq_len=past_len + q_len)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, position_ids)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value) if use_cache else None
        # query head h reads key-value head h // groups, as the release's repeat does
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        mask, causal = attention_mask, False
        if mask is None and q_len > 1:  # the release's eager model always passes one; be safe anyway
            if past_len == 0:
                causal = True
            else:
                mask = torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=query.device).tril(past_len)
        elif mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * head_dim)
        return self.wo(out), None, present

    return type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__, "_sa2va_dpo_sdpa": True})


def use_sdpa_attention(model: nn.Module) -> int:
    """Give every eager InternLM2Attention of `model` the SDPA forward (same weights, same
    arithmetic up to rounding; the weights are returned by the eager path when asked for).
    Nothing changes with SA2VA_DPO_ATTENTION=eager, or where the release runs flash attention.
    Returns the number of attention modules switched."""
    import os

    if os.environ.get(ATTENTION_ENV, "sdpa").strip().lower() == "eager":
        return 0
    switched = 0
    for module in model.modules():
        base = type(module)
        if getattr(base, "_sa2va_dpo_sdpa", False) or not _is_release_eager_attention(module):
            continue
        if base not in _SDPA_CLASSES:
            _SDPA_CLASSES[base] = _with_sdpa(base)
        module.__class__ = _SDPA_CLASSES[base]
        switched += 1
    return switched
