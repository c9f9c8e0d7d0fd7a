"""Load-time self-check of every checkpoint: silent corruption becomes a one-line refusal.

Loading a remote-code checkpoint on a transformers version it was not written for can "succeed"
with wrong token ids or garbage buffers (the project met both with Sa2VA-8B/26B on 5.x). After
`sa2va.model.load_sa2va` has applied its repairs, `check_loaded` verifies, for every family:
1. tokens: every id the forward uses ([SEG], <IMG_CONTEXT>, <img>, </img>, pad, the template's
   tokens) is below the LLM embedding's row count, and the tokenizer gives each token of
   tokenizer_config.json's `added_tokens_decoder` the id listed there;
2. tensors: no parameter, buffer or tensor attribute is on the meta device or non-finite;
3. rotary embeddings: every `inv_freq` equals the frequencies the LLM config implies
   (rope_theta, head dim), and cached cos/sin tables agree with it.
A failure raises UserError naming the folder, the part, and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .compat import is_release_rotary
from .errors import UserError

# Cached cos/sin rows compared with a recomputation (a sample: the tables are long on big models).
_CHECKED_POSITIONS = 64


def check_loaded(sa2va: Any) -> None:
    """Run the three checks on a loaded `sa2va.model.Sa2VA`; raise UserError on the first problem."""
    ids = {"[SEG]": sa2va.seg_token_id}
    if sa2va.img_context_token_id >= 0:
        ids["<IMG_CONTEXT>"] = sa2va.img_context_token_id
    rows = int(sa2va.llm.get_input_embeddings().weight.shape[0])
    check_token_ids(rows, sa2va.tokenizer, sa2va.path, ids, sa2va.template)
    check_tensors(sa2va.model, sa2va.path)
    check_rotary(sa2va.model, sa2va.path)


# --------------------------------------------------------------------------- 1. tokens


def check_token_ids(rows: int, tokenizer: Any, folder: Path, token_ids: dict[str, int], template: str) -> None:
    """rows: the LLM input embedding's row count; template: the chat template ('' if none)."""
    fix = ("the tokenizer and the model disagree: load the tokenizer class that the checkpoint was "
           "trained with (tokenizer_config.json's tokenizer_class) and check llm_config.vocab_size")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("added_tokens_decoder") or {}
        for tid, entry in declared.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content is None:
                continue
            got = tokenizer.convert_tokens_to_ids(content)
            if got != int(tid):
                raise UserError(f"self-check of {folder}: the tokenizer gives {content} the id {got}, but "
                                f"tokenizer_config.json declares {tid}; {fix}")
    used = dict(token_ids)
    if tokenizer.pad_token_id is not None:
        used["pad"] = int(tokenizer.pad_token_id)
    prompt = (template.format(input="<img><IMG_CONTEXT></img>\nsegment") if template else "") + "It is [SEG]."
    for tid in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
        used.setdefault(tokenizer.convert_ids_to_tokens(int(tid)), int(tid))
    for token, tid in used.items():
        if not 0 <= tid < rows:
            raise UserError(f"self-check of {folder}: token {token} has id {tid}, but the LLM embedding has "
                            f"{rows} rows; {fix}")


# --------------------------------------------------------------------------- 2. tensors


def _tensors(model: nn.Module):
    """(name, tensor) for parameters, buffers and plain tensor attributes (e.g. SAM2's freqs_cis)."""
    yield from model.named_parameters()
    yield from model.named_buffers()
    for prefix, module in model.named_modules():
        registered = set(module._parameters) | set(module._buffers)
        for attr, value in vars(module).items():
            if isinstance(value, Tensor) and attr not in registered:
                yield (f"{prefix}.{attr}" if prefix else attr), value


def check_tensors(model: nn.Module, folder: Path) -> None:
    for name, tensor in _tensors(model):
        if tensor.is_meta:
            raise UserError(f"self-check of {folder}: {name} is still on the meta device after loading (never "
                            "materialised); the checkpoint or its remote code does not load on this "
                            "transformers version")
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                raise UserError(f"self-check of {folder}: {name} holds NaN or infinite values; the weights are "
                                "damaged (re-download or re-export the checkpoint)")


# --------------------------------------------------------------------------- 3. rotary embeddings


def _rope_facts(config: Any) -> tuple[float, int] | None:
    """(theta, rotary dim) implied by an LLM config, or None if it has no plain RoPE."""
    params = getattr(config, "rope_parameters", None)
    theta = getattr(config, "rope_theta", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    heads = getattr(config, "num_attention_heads", None)
    if theta is None or not heads:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return float(theta), int(head_dim * getattr(config, "partial_rotary_factor", 1.0))


def _expected_inv_freq(module: nn.Module, config: Any) -> Tensor | None:
    facts = _rope_facts(config)
    if facts is None:
        return None
    theta, dim = facts
    expected = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    if is_release_rotary(module):
        return expected  # linear/dynamic variants of the release scale positions, not inv_freq
    kind = getattr(module, "rope_type", "default")
    if kind in ("default", "dynamic"):
        return expected
    if kind == "linear":
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        return expected / float(params.get("factor", 1.0))
    return None  # yarn, llama3, ...: computed by transformers itself; not re-derived here


def _owner_configs(model: nn.Module) -> list[tuple[str, Any]]:
    """(module prefix, text config) of every sub-model that owns a config, longest prefix first."""
    owners = []
    for prefix, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            owners.append((prefix, text))
    return sorted(owners, key=lambda item: -len(item[0]))


def check_rotary(model: nn.Module, folder: Path) -> None:
    owners = _owner_configs(model)
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, Tensor):
            continue
        config = next((cfg for prefix, cfg in owners if name.startswith(prefix)), None)
        expected = _expected_inv_freq(module, config) if config is not None else None
        if expected is None:
            continue
        got = inv_freq.detach().double().cpu()
        tol = 1e-2 if inv_freq.dtype in (torch.bfloat16, torch.float16) else 1e-5
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=0):
            raise UserError(f"self-check of {folder}: the rotary frequencies of {name} (inv_freq) are not the "
                            f"ones the LLM config implies (rope_theta {_rope_facts(config)[0]:g}, rotary dim "
                            f"{_rope_facts(config)[1]}): RoPE would be wrong; the loader cannot repair this "
                            "buffer, check the checkpoint's rotary buffers and llm_config.rope_theta")
        _check_cos_sin(module, name, folder)


def _check_cos_sin(module: nn.Module, name: str, folder: Path) -> None:
    cos, sin = getattr(module, "cos_cached", None), getattr(module, "sin_cached", None)
    if not (isinstance(cos, Tensor) and isinstance(sin, Tensor) and is_release_rotary(module)):
        return
    n = min(_CHECKED_POSITIONS, cos.shape[0])
    positions = torch.arange(n, dtype=torch.float64)
    scale = float(getattr(module, "scaling_factor", 1.0)) if "Linear" in type(module).__name__ else 1.0
    freqs = torch.outer(positions / scale, module.inv_freq.detach().double().cpu())
    emb = torch.cat((freqs, freqs), dim=-1)
    tol = 2e-2 if cos.dtype in (torch.bfloat16, torch.float16) else 1e-4
    for label, table, ref in (("cos_cached", cos, emb.cos()), ("sin_cached", sin, emb.sin())):
        if not torch.allclose(table[:n].detach().double().cpu(), ref, atol=tol, rtol=0):
            raise UserError(f"self-check of {folder}: {name}.{label} does not match its inv_freq: RoPE would "
                            "be wrong; the loader could not rebuild this table")
