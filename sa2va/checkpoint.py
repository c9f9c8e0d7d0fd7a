"""Checkpoints that are never half-written, and the final HF export.

A checkpoint is a folder OUTPUT/checkpoints/step_NNNNNNN written under a temporary name and
renamed when complete (with a COMPLETE marker written last inside it). It holds:
  adapter/                  the LoRA adapter in PEFT's own format (adapter_config.json + safetensors)
  trained.safetensors       every trained parameter by its name in the Sa2VA model
  training_state.pt         optimizer, scheduler and RNG states (loaded with weights_only=True)
  trainer_state.json        step, epoch, position in the epoch, best held-out Dice, metrics
  config.yaml               the resolved run config
`--resume` takes the newest complete one; a partial folder is never taken.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .fileio import atomic_dir

COMPLETE = "COMPLETE"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files are intact; damaged ones are passed over."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path) is None:
            return path
        # damaged after the rename (disk trouble, a hand edit): fall back to the previous one
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None. Cheap: headers only."""
    from safetensors import safe_open

    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            return "trainer_state.json has no step"
        with safe_open(str(path / "trained.safetensors"), framework="pt"):
            pass  # the header is parsed and the file must cover every tensor it lists
        if not zipfile.is_zipfile(path / "training_state.pt"):  # torch.save's format; truncation loses the index
            return "training_state.pt is not a complete torch.save file"
    except (OSError, ValueError) as err:  # ValueError: bad JSON, bytes that are not UTF-8
        return str(err)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
        return f"{type(err).__name__}: {err}"
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    trained: dict[str, torch.Tensor],
    peft_model: nn.Module | None,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    best: bool = False,
) -> Path:
    """Write a checkpoint atomically (call on rank 0 only), then prune old ones.

    best=True writes checkpoints/best instead (the best held-out Dice; never pruned).
    """
    target = checkpoint_dir(output_dir) / ("best" if best else f"step_{step:07d}")
    remove_stale(checkpoint_dir(output_dir))
    with atomic_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
        if peft_model is not None:
            save_adapter(peft_model, trained, tmp / "adapter")
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / COMPLETE).write_text("ok\n")
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_stale(folder: Path) -> None:
    """Clear what a killed writer left in `folder` (one writer per folder: rank 0 of one run).

    `.NAME.<random>.tmp` folders are unfinished writes: removed. `.NAME.old` is a complete
    folder that atomic_dir was replacing: put back if NAME is missing (killed between its two
    renames), else removed.
    """
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if not item.name.startswith("."):
            continue
        if item.name.endswith(".tmp") and item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        elif item.name.endswith(".tmp"):
            item.unlink(missing_ok=True)
        elif item.name.endswith(".old") and item.is_dir():
            original = folder / item.name[1:-len(".old")]
            if original.exists():
                shutil.rmtree(item, ignore_errors=True)
            else:
                os.replace(item, original)


def save_adapter(peft_model: nn.Module, trained: dict[str, torch.Tensor], folder: Path) -> None:
    """The LoRA weights in PEFT's format, loadable by PeftModel.from_pretrained on the LLM."""
    from peft import get_peft_model_state_dict

    # The LLM's name in the Sa2VA model (language_model, or the Qwen-VL text model): what
    # precedes PEFT's own "base_model.model." in the LoRA parameters' names.
    lora = next((k for k in trained if "lora_" in k and "base_model.model." in k), None)
    prefix = lora[: lora.index("base_model.model.")] if lora else "language_model."
    lm_state = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in trained.items() if k.startswith(prefix)}
    adapter_state = get_peft_model_state_dict(peft_model, state_dict=lm_state)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(folder / "adapter_model.safetensors"))
    peft_model.peft_config["default"].save_pretrained(str(folder))


def load_trained(path: Path) -> dict[str, torch.Tensor]:
    file = path / "trained.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint {path} has no trained.safetensors")
    return load_file(str(file))


def load_training_state(path: Path) -> dict[str, Any]:
    file = path / "training_state.pt"
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, a torn zip, a missing file: one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot load {file} (loaded with torch.load(weights_only=True)): "
                        f"{type(err).__name__}: {first}") from err


def apply_trained(model: nn.Module, trained: dict[str, torch.Tensor], source: Path) -> None:
    """Copy trained tensors into a model prepared the same way (LoRA added, same names)."""
    params = dict(model.named_parameters())
    missing = [k for k in trained if k not in params]
    if missing:
        raise UserError(f"checkpoint {source} holds {len(missing)} tensors this model lacks "
                        f"(e.g. {missing[0]}): was it trained with another lora/train_modules config?")
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value.to(params[name].dtype))


def is_training_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "trained.safetensors").is_file() and (p / "config.yaml").is_file()


def export_hf(sa2va: Any, out: str | Path, overwrite: bool = False) -> Path:
    """Merge LoRA into the LLM and write a full HF folder that loads like the original.

    `sa2va` is a loaded model with LoRA added and trained weights applied; it is modified
    (the adapter is merged), so call this last.
    """
    model = sa2va.model
    source = Path(sa2va.path)
    sa2va.llm = sa2va.llm.merge_and_unload()
    model.requires_grad_(False)
    model.to(sa2va.dtype)  # trained parameters were float32 masters; store the base dtype
    out = Path(out)
    for stale in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # an export that was killed half-way
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))  # handles tied weights and sharding
        # The remote code, tokenizer and the original config.json (with its auto_map).
        for item in source.iterdir():
            if item.is_file() and not _is_weight_file(item.name):
                shutil.copy2(item, tmp / item.name)
    return Path(out)


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")



def load_for_inference(path: str | Path, trust_remote_code: bool, device: str = "auto", dtype: str = "auto"):
    """An HF Sa2VA folder (original or exported), or a training checkpoint over its base model.

    A training checkpoint is recognised by trained.safetensors + config.yaml; its base model
    is `model.path` of the config it was trained with.
    """
    from .config import load_config
    from .model import add_lora_and_freeze, load_sa2va

    p = Path(path)
    if not is_training_checkpoint(p):
        if (p / "checkpoints").is_dir() and not (p / "config.json").is_file():
            hint = " (it looks like a training output folder: pass OUT/final or OUT/checkpoints/step_N)"
            raise UserError(f"{p} is neither a model folder nor a training checkpoint{hint}")
        return load_sa2va(p, trust_remote_code, device=device, dtype=dtype)
    cfg = load_config(p / "config.yaml")
    sa2va = load_sa2va(cfg.model.path, trust_remote_code or cfg.model.trust_remote_code, device=device, dtype=dtype)
    add_lora_and_freeze(sa2va, cfg.lora, cfg.train_modules)
    apply_trained(sa2va.model, load_trained(p), p)
    # Inference needs no adapter: merge it, and store everything in the load dtype (the trained
    # float32 masters would otherwise mix dtypes with the bf16 base on GPU).
    sa2va.llm = sa2va.llm.merge_and_unload()
    sa2va.model.requires_grad_(False)
    sa2va.model.to(sa2va.dtype)
    return sa2va
