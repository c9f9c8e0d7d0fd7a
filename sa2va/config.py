"""The run configuration: a dataclass tree loaded from YAML, with `key.sub=value` overrides.

Everything is validated before any work starts: unknown keys, wrong types and impossible
values are refused with the dotted key named, so a typo never silently trains on a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# Where the entrypoints look when the user gives no config (the mission's own command).
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "v8.yaml"


@dataclass
class ModelConfig:
    path: str = "models/sa2va_vessel_hf"  # a Sa2VA HF remote-code folder
    # Loading runs the Python files shipped in the model folder; the user must say yes.
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU; float32 on CUDA: no bf16 autocast
    # Benchmarks only: build the architecture from config.json with random weights (a folder
    # written by `python -m sa2va.tiny --preset 26b --no-weights`); nothing is exported.
    random_weights: bool = False
    question: str = "Please segment the blood vessels."
    answer: str = "It is [SEG]."


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Linear layers of the LLM that get adapters; the output head is never adapted.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainModulesConfig:
    text_hidden_fcs: bool = True
    mask_decoder: bool = True
    mlp1: bool = False  # the vision projector (InternVL mlp1, Qwen-VL merger); trained: features cached before it


@dataclass
class DataConfig:
    root: str = "data/vessels"  # holds dpo_annotations.json (pairs) and the files it names
    annotations: str = "dpo_annotations.json"
    max_samples: int | None = 500
    val_root: str | None = None  # a data set folder (images/ masks/ [fov/]) for held-out Dice
    val_max_images: int | None = 50
    # Online DPO: every refresh_every optimizer steps (0 = never) the rejected masks are remade
    # from the current policy: its mask at each threshold and refresh_samples Bernoulli draws,
    # kept only where 1 - Dice(candidate, chosen) >= refresh_min_gap (the gap rule).
    refresh_every: int = 0
    refresh_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    refresh_samples: int = 0
    refresh_min_gap: float = 0.15


@dataclass
class LossConfig:
    # Weights of the loss parts; a part with weight 0 is not computed.
    dice_dpo: float = 0.0  # the seed's formula: -logsigmoid(beta * (log Dice(p,w) - log Dice(p,l)))
    mask_dpo: float = 0.0  # true DPO on the per-pixel Bernoulli likelihood, against the reference
    bce: float = 0.0  # supervised sigmoid BCE against the chosen mask
    dice: float = 0.0  # supervised soft Dice loss against the chosen mask
    grpo: float = 0.0  # mask GRPO: masks sampled from the policy, scored by `reward` against the chosen mask
    samples: int = 8  # GRPO group size: masks sampled per image from one forward
    reward: str = "dice"  # GRPO reward: dice or cldice
    kl: float = 0.05  # GRPO: weight of the exact per-pixel KL(policy || reference)
    beta: float = 0.2
    # How the mask log-likelihood ratio is normalised (beta's meaning depends on it):
    # sum = over all pixels; mean = divided by all pixels; mean_disagree = divided by the
    # number of pixels where chosen and rejected differ.
    mask_dpo_norm: str = "mean_disagree"
    # Where masks and logits meet: full = logits upsampled to the image size as predict_forward
    # does (what evaluation measures; thin vessels survive); low = masks nearest-resized to the
    # low-res logits (the official recipe).
    resolution: str = "full"
    dice_eps: float = 1e-6  # inside log(Dice + eps) of dice_dpo
    soft_dice_smooth: float = 1.0  # the official recipe's Dice-loss smoothing


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    fused: bool = True  # fused AdamW where the device supports it


@dataclass
class TrainConfig:
    # Pairs per rank per optimizer step (the seed's v8: 4). Split into micro_batch_size x grad_accum:
    # "auto" picks the largest micro-batch that fits (sa2va/batching.py); giving both keeps that split.
    pairs_per_step: int = 4
    micro_batch_size: int | str = "auto"
    grad_accum: int | None = None  # null = pairs_per_step / micro_batch_size
    memory_budget_gb: float | None = None  # for auto: null = the device's free memory (CPU: available RAM)
    epochs: int = 1
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0 = only at the end
    save_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # NaN/inf steps in a row before the run stops
    cache_frozen: bool = True  # ViT and SAM2 image-encoder features computed once per image
    cache_on_device: bool = True  # keep them on the GPU (~10 MB per image at real sizes) or in CPU memory
    activation_checkpointing: bool = False
    compile: bool | str = "auto"  # per-layer torch.compile of the LLM: auto = on CUDA, not on CPU


@dataclass
class TilingConfig:
    # Native resolution (docs/resolution.md): null = off (the whole image squeezed into SAM2's
    # square input, as predict_forward does); a tile side in pixels (>= 32); or auto = tiles of
    # the model's logit-grid side, so the grid is at least as fine as the image.
    size: int | str | None = None
    overlap: int = 32  # pixels shared by neighbouring tiles, less than half a tile


FSDP_GATHER = ("per_use", "per_step")


@dataclass
class DistConfig:
    strategy: str = "ddp"  # ddp or fsdp (FSDP2 fully_shard, for models that do not fit one GPU)
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    # fsdp: when the frozen layer weights are all-gathered. per_use = for each forward and again
    # for each backward (least memory); per_step = once per optimizer step, kept across its
    # micro-batches (the whole LLM resident during the step, as with DDP; fewer all-gathers)
    fsdp_gather: str = "per_use"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_modules: TrainModulesConfig = field(default_factory=TrainModulesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    output_dir: str = "runs/v8"
    max_steps: int | None = None  # optimizer steps; None = train.epochs over the data
    device: str = "auto"  # auto = cuda when available, else cpu


def resolve_config_path(name: str | os.PathLike) -> Path:
    """Find a config: the path as given, else the same name (with .yaml) under configs/."""
    path = Path(name)
    if path.is_file():
        return path
    candidates = [CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config {name} not found (looked in . and {CONFIG_DIR}; known: {known})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML into the dataclass tree, apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        file = resolve_config_path(path)
        source = str(file)
        try:
            loaded = yaml.safe_load(file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            detail = " ".join(str(err).split())  # one line: a YAMLError's text holds line breaks
            raise UserError(f"{file}: not valid YAML: {detail}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{file}: expected a mapping of keys at the top level")
        raw = loaded
    in_file = set(raw.get("train") or {}) if isinstance(raw.get("train"), dict) else set()
    overridden: set[str] = set()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed)
        overridden.add(key.strip().removeprefix("train."))
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg)
    # pairs_per_step conflicts with a split only when given in the same place (file or overrides).
    split = {"micro_batch_size", "grad_accum"}
    strict = ("pairs_per_step" in overridden and split <= in_file | overridden) or {"pairs_per_step"} | split <= in_file
    split_pairs(cfg, strict=strict)
    return cfg


def split_pairs(cfg: Config, strict: bool = False) -> None:
    """Make train.micro_batch_size x train.grad_accum = train.pairs_per_step where the config fixes
    the split; leave micro_batch_size "auto" (grad_accum null) for the loop to choose.

    Both micro_batch_size and grad_accum given: they win (the seed's 1 x 4 runs as written) and
    pairs_per_step becomes their product; with `strict`, a pairs_per_step given beside them must agree."""
    t = cfg.train
    if t.micro_batch_size != "auto" and t.grad_accum is not None:
        product = t.micro_batch_size * t.grad_accum
        if strict and t.pairs_per_step != product:
            raise UserError(f"config key train.pairs_per_step is {t.pairs_per_step}, but train.micro_batch_size "
                            f"{t.micro_batch_size} x train.grad_accum {t.grad_accum} = {product}; give two of the three")
        t.pairs_per_step = product
    elif t.micro_batch_size != "auto":
        if t.pairs_per_step % t.micro_batch_size:
            raise UserError(f"config key train.micro_batch_size {t.micro_batch_size} must divide "
                            f"train.pairs_per_step {t.pairs_per_step} (or give train.grad_accum too)")
        t.grad_accum = t.pairs_per_step // t.micro_batch_size
    elif t.grad_accum is not None:  # accumulation fixed: the micro-batch follows
        if t.pairs_per_step % t.grad_accum:
            raise UserError(f"config key train.grad_accum {t.grad_accum} must divide train.pairs_per_step "
                            f"{t.pairs_per_step}")
        t.micro_batch_size = t.pairs_per_step // t.grad_accum


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r} ({source})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise UserError(f"unknown config key {names} ({source}); known under {prefix or 'top level'}: "
                        + ", ".join(sorted(fields)))
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, prefix + name, source)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner:  # the first type that takes the value (int | str: 256 or auto)
            try:
                return _coerce(option, value, key, source)
            except UserError:
                if len(inner) == 1:
                    raise
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise UserError(f"config key {key} must be {names}, got {value!r} ({source})")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a list, got {value!r} ({source})")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise UserError(f"config key {key} must be a finite number, got {value!r} ({source})")
    elif hint is str:
        if isinstance(value, str):
            return value
    type_name = getattr(hint, "__name__", str(hint))
    raise UserError(f"config key {key} must be {type_name}, got {value!r} ({source})")


def validate(cfg: Config) -> None:
    """Refuse values that cannot work, naming the key."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise UserError(f"config key {key} {what}")

    # Keys typed `int | str` / `bool | str` take any string: a wrong word is a type error, reported first.
    need(cfg.train.micro_batch_size == "auto" or (isinstance(cfg.train.micro_batch_size, int)
                                                   and cfg.train.micro_batch_size > 0),
         "train.micro_batch_size", f"must be a number > 0 or auto, got {cfg.train.micro_batch_size!r}")
    need(cfg.train.compile in (True, False, "auto"), "train.compile", "must be true, false or auto")
    need(cfg.lora.r > 0, "lora.r", "must be > 0")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    need(cfg.model.dtype in ("auto", "bfloat16", "float16", "float32"), "model.dtype",
         "must be one of auto, bfloat16, float16, float32")
    need("[SEG]" in cfg.model.answer, "model.answer", "must contain [SEG]")
    need(cfg.data.max_samples is None or cfg.data.max_samples > 0, "data.max_samples", "must be > 0 or null")
    weights = [cfg.loss.dice_dpo, cfg.loss.mask_dpo, cfg.loss.bce, cfg.loss.dice, cfg.loss.grpo]
    need(all(w >= 0 for w in weights), "loss", "weights must be >= 0")
    need(sum(weights) > 0, "loss", "needs at least one weight > 0 (dice_dpo, mask_dpo, bce, dice, grpo)")
    need(cfg.loss.grpo == 0 or cfg.loss.samples >= 2, "loss.samples",
         "must be >= 2 with loss.grpo (the advantage is normalised within each image's group of samples)")
    need(cfg.loss.reward in ("dice", "cldice"), "loss.reward", "must be dice or cldice")
    need(cfg.loss.kl >= 0, "loss.kl", "must be >= 0")
    need(cfg.data.refresh_every >= 0, "data.refresh_every", "must be >= 0 (0 = rejected masks never refreshed)")
    if cfg.data.refresh_every > 0:
        need(cfg.loss.mask_dpo > 0 or cfg.loss.dice_dpo > 0, "data.refresh_every",
             "refreshes rejected masks, which only loss.mask_dpo and loss.dice_dpo use: set one, or 0 here")
        need(not cfg.model.random_weights, "data.refresh_every",
             "needs the model's predictions, and model.random_weights has none: set it to 0")
        need(bool(cfg.data.refresh_thresholds) or cfg.data.refresh_samples > 0, "data.refresh_every",
             "needs model predictions to make rejected masks from: data.refresh_thresholds or data.refresh_samples")
    need(all(0 < t < 1 for t in cfg.data.refresh_thresholds), "data.refresh_thresholds", "must lie in (0, 1)")
    need(cfg.data.refresh_samples >= 0, "data.refresh_samples", "must be >= 0")
    need(0 < cfg.data.refresh_min_gap <= 1, "data.refresh_min_gap", "must be in (0, 1]")
    need(cfg.loss.beta > 0, "loss.beta", "must be > 0")
    need(cfg.loss.mask_dpo_norm in ("sum", "mean", "mean_disagree"), "loss.mask_dpo_norm",
         "must be one of sum, mean, mean_disagree")
    need(cfg.loss.resolution in ("full", "low"), "loss.resolution", "must be full or low")
    need(cfg.loss.dice_eps > 0, "loss.dice_eps", "must be > 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         "must be two numbers in [0, 1)")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
    need(cfg.train.pairs_per_step > 0, "train.pairs_per_step", "must be > 0")
    need(cfg.train.grad_accum is None or cfg.train.grad_accum > 0, "train.grad_accum", "must be > 0 or null")
    need(cfg.train.memory_budget_gb is None or cfg.train.memory_budget_gb > 0, "train.memory_budget_gb",
         "must be > 0 (GB) or null")
    need(cfg.train.epochs > 0, "train.epochs", "must be > 0")
    need(cfg.train.log_every > 0, "train.log_every", "must be > 0")
    need(cfg.train.eval_every >= 0, "train.eval_every", "must be >= 0")
    need(cfg.train.save_every >= 0, "train.save_every", "must be >= 0")
    need(cfg.train.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0")
    need(cfg.train.max_bad_steps > 0, "train.max_bad_steps", "must be > 0")
    need(cfg.dist.strategy in ("ddp", "fsdp"), "dist.strategy", "must be ddp or fsdp")
    need(cfg.dist.backend in ("auto", "nccl", "gloo"), "dist.backend", "must be auto, nccl or gloo")
    need(cfg.dist.fsdp_gather in FSDP_GATHER, "dist.fsdp_gather", f"must be one of {', '.join(FSDP_GATHER)}")
    need(cfg.max_steps is None or cfg.max_steps > 0, "max_steps", "must be > 0 or null")
    need(bool(cfg.output_dir), "output_dir", "must not be empty")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    from .tiling import check_tiling

    check_tiling(cfg.tiling.size, cfg.tiling.overlap)
    need(cfg.dist.strategy != "fsdp" or cfg.train.cache_frozen, "train.cache_frozen",
         "must be true with dist.strategy=fsdp (the frozen encoders run once, before sharding)")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
