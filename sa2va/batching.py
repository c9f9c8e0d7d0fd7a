"""What the training loop chooses before the model loads: the micro-batch and per-layer compile.

`train.pairs_per_step` pairs per rank make one optimizer step. `train.micro_batch_size: auto`
splits them as the largest micro-batch (a divisor of pairs_per_step, so every step sees the
same pairs whatever the split) whose peak memory, by the memory model below, fits the budget:
`train.memory_budget_gb`, or the device's free memory (available RAM on CPU). A budget that
cannot hold micro-batch 1 is refused here, before any weight is read.

The memory model (bytes): the weights (read from the checkpoint's safetensors headers, or from
config.json for a weightless benchmark folder), the trained parameters' float32 copy, gradient
and AdamW moments, the cached frozen features, masks and reference logits, and per pair the
LLM activations kept for backward: layers x tokens x (16 x hidden + 5 x intermediate) values
(bf16 on CUDA), plus the loss maps at the image size. The two coefficients were fitted to the
eager peaks measured on an H200 at the 4B and 26B shapes (docs/performance.md: 1.63 and 4.45 GiB
per pair at 284 tokens); they over-estimate compiled runs by about 20%.

Per-layer compile (`train.compile`: auto = on CUDA) compiles each LLM decoder layer; a probe
forward and backward runs the compilation before the first step, and if it fails the layers go
back to eager with a message (the run goes on).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .compat import ATTENTION_ENV
from .errors import UserError
from .preprocess import tile_grid

GIB = 2**30
ACT_HIDDEN, ACT_INTER = 16, 5  # activation values kept per token and layer: x hidden, x intermediate
PROMPT_TOKENS = 40  # template + question + answer around the image tokens
SAM_FEATURE_CHANNELS = (32, 64, 256)  # SAM2's high-res features at 1/4, 1/8 and the 1/16 embedding
HIERA_L_PARAMS = 224_000_000  # SAM2 Hiera-L with its heads, when no weights say otherwise


# --------------------------------------------------------------------------- the model's shape


@dataclass
class ModelShape:
    """Sizes the memory model needs, read from a checkpoint folder without building the model."""

    params: dict[str, int]  # language_model / vision_model / sam2 / other
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vit_size: int
    vit_tokens: int  # ViT tokens per tile (patches + CLS)
    vit_hidden: int
    image_tokens: int  # LLM tokens per ViT tile
    min_tiles: int
    max_tiles: int
    pixel_unit: int  # Qwen-VL (dynamic resolution): pixels per side of one LLM image token; 0 = InternVL tiles
    thumbnail: bool
    sam_size: int
    eager_attention: bool
    source: str  # "weights" (safetensors headers) or "config.json" (formulas)


def _safetensors_counts(folder: Path) -> dict[str, int] | None:
    """Parameter counts per top-level part from the safetensors headers (no tensor is read)."""
    files = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    if not files:
        return None
    counts = {"language_model": 0, "vision_model": 0, "sam2": 0, "other": 0}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in meta["shape"]:
                n *= d
            part = next((p for p in ("language_model", "vision_model") if name.startswith(p + ".")), None)
            if part is None:
                part = "sam2" if name.startswith("grounding_encoder.") else "other"
            counts[part] += n
    return counts


def _formula_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts from config.json alone (weightless benchmark folders)."""
    llm, vit = config.get("llm_config") or config["text_config"], config["vision_config"]
    h, layers, inter = int(llm["hidden_size"]), int(llm["num_hidden_layers"]), int(llm["intermediate_size"])
    heads = int(llm["num_attention_heads"])
    kv = int(llm.get("num_key_value_heads") or heads)
    head_dim = int(llm.get("head_dim") or h // heads)
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * inter
    vocab = int(llm.get("vocab_size", 0))
    embeddings = vocab * h * (1 if llm.get("tie_word_embeddings") else 2)
    hv, lv, iv = int(vit["hidden_size"]), int(vit.get("num_hidden_layers") or vit["depth"]), int(vit["intermediate_size"])
    patch = vit["patch_size"][0] if isinstance(vit["patch_size"], list) else vit["patch_size"]
    vision = lv * (4 * hv * hv + 2 * hv * iv) + 3 * patch * patch * hv
    width = int(hv / config.get("downsample_ratio", 0.5) ** 2)
    other = width * h + h * h + h * h + h * 256  # mlp1, text_hidden_fcs
    return {"language_model": layers * per_layer + embeddings, "vision_model": vision,
            "sam2": HIERA_L_PARAMS, "other": other}


def read_shape(folder: str | Path) -> ModelShape:
    """The sizes of a Sa2VA checkpoint folder (or hub id), from config.json and the weight headers."""
    from .hub import resolve_model_path

    folder = resolve_model_path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        llm, vit = config.get("llm_config") or config["text_config"], config["vision_config"]
        counts = _safetensors_counts(folder)
        source = "weights"
        if counts is None:
            counts, source = _formula_counts(config), "config.json"
        attn = str(llm.get("attn_implementation") or llm.get("_attn_implementation") or "sdpa")
        if (llm.get("architectures") or [None])[0] == "InternLM2ForCausalLM":  # compat.use_sdpa_attention
            attn = os.environ.get(ATTENTION_ENV, "sdpa").strip().lower() if attn == "eager" else attn
        common = dict(params=counts, layers=int(llm["num_hidden_layers"]), hidden=int(llm["hidden_size"]),
                      intermediate=int(llm["intermediate_size"]), heads=int(llm["num_attention_heads"]),
                      thumbnail=False, sam_size=int((config.get("sam2_config") or {}).get("image_size", 1024)),
                      eager_attention=attn == "eager", source=source)
        if "spatial_merge_size" in vit:  # Qwen-VL: one LLM token per merge x merge patches, pixels clamped
            unit = int(vit["patch_size"]) * int(vit["spatial_merge_size"])
            processor = folder / "preprocessor_config.json"
            pre = json.loads(processor.read_text()) if processor.is_file() else {}
            return ModelShape(vit_size=unit, vit_tokens=int(vit["spatial_merge_size"]) ** 2,
                              vit_hidden=int(vit["hidden_size"]), image_tokens=1,
                              min_tiles=int(config.get("min_pixels") or pre.get("min_pixels") or 4 * 28 * 28),
                              max_tiles=int(config.get("max_pixels") or pre.get("max_pixels") or 16384 * 28 * 28),
                              pixel_unit=unit, **common)  # defaults: Qwen2.5-VL's image processor
        vit_size = int(config.get("force_image_size") or vit["image_size"][0])
        patch = vit["patch_size"][0] if isinstance(vit["patch_size"], list) else vit["patch_size"]
        tokens = int((vit_size // patch) ** 2 * config.get("downsample_ratio", 0.5) ** 2)
        dynamic = bool(config.get("dynamic_image_size", True))
        common["thumbnail"] = bool(config.get("use_thumbnail", True))
        return ModelShape(
            vit_size=vit_size, vit_tokens=(vit_size // patch) ** 2 + 1, vit_hidden=int(vit["hidden_size"]),
            image_tokens=tokens, min_tiles=int(config.get("min_dynamic_patch", 1)),
            max_tiles=int(config.get("max_dynamic_patch", 12)) if dynamic else 1, pixel_unit=0, **common)
    except (OSError, KeyError, TypeError, ValueError, struct.error) as err:
        raise UserError(f"cannot read the sizes of the model in {folder} for train.micro_batch_size=auto: "
                        f"{type(err).__name__}: {err}; give train.micro_batch_size a number") from err


def tiles_for(shape: ModelShape, width: int, height: int) -> int:
    """ViT tiles of one image (InternVL's dynamic tiling, as preprocess.vit_tiles cuts them); for
    Qwen-VL, its LLM image tokens (the pixel count clamped to min/max_pixels, per unit x unit)."""
    if shape.pixel_unit:
        pixels = min(max(width * height, shape.min_tiles), shape.max_tiles)
        return -(-pixels // shape.pixel_unit**2)
    cols, rows = tile_grid(width, height, shape.vit_size, shape.min_tiles, shape.max_tiles)
    n = cols * rows
    return n + 1 if shape.thumbnail and n > 1 else n


def image_sizes(paths: list[str | Path]) -> list[tuple[int, int]]:
    """(width, height) of each image from its header (no pixels decoded)."""
    from PIL import Image

    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(img.size)
    return sizes


# --------------------------------------------------------------------------- the memory model


@dataclass
class MemoryModel:
    """Bytes at the two peaks of a run: encoding (every weight resident) and training."""

    weights: float  # every weight, in the load dtype
    train_weights: float  # what stays resident while training
    trained_states: float  # float32 master copy, gradient, AdamW moments of the trained parameters
    caches: float  # cached features, masks and reference logits kept on the device
    encode_per_image: float  # transient encoder activations
    per_pair: float  # activations kept for backward, and the loss maps, per pair of a micro-batch
    overhead: float
    tokens: int  # LLM tokens of the longest sample
    parts: dict[str, float] = field(default_factory=dict)

    def peak(self, micro_batch: int) -> float:
        # Encoding runs in chunks of max(micro-batch, 4) images with every weight resident.
        encode = self.weights + self.trained_states / 8 + self.caches + max(4, micro_batch) * self.encode_per_image
        train = self.train_weights + self.trained_states + self.caches + micro_batch * self.per_pair
        return max(encode, train) + self.overhead


def memory_model(shape: ModelShape, train: Any, lora_r: int, loss_resolution: str, device_type: str,
                 dtype_bytes: int, world_size: int, fsdp: bool, sizes: list[tuple[int, int]],
                 n_pairs: int) -> MemoryModel:
    """The memory model of one rank (see the module docstring)."""
    cuda = device_type == "cuda"
    p = shape.params
    total = sum(p.values())
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    lora = layers * lora_r * 2 * (4 * h + 3 * (h + i))  # an upper bound: every linear adapted
    trained = lora + 2 * h * h + 4_500_000  # + text_hidden_fcs and SAM2's mask decoder
    llm = p["language_model"] / (world_size if fsdp else 1)
    if cuda and train.cache_frozen:  # the frozen encoders leave the GPU once every image is encoded
        resident = llm + p["other"] + 0.02 * p["sam2"]
    else:
        resident = llm + p["other"] + p["sam2"] + p["vision_model"]
    tiles = [tiles_for(shape, w, hh) for w, hh in sizes] or [1]
    tokens = max(tiles) * shape.image_tokens + PROMPT_TOKENS
    act = 2 if cuda else 4  # autocast bf16 on CUDA, float32 on CPU
    if train.activation_checkpointing:
        per_pair_llm = layers * tokens * h * act + tokens * (ACT_HIDDEN * h + ACT_INTER * i) * act
    else:
        per_pair_llm = layers * tokens * (ACT_HIDDEN * h + ACT_INTER * i) * act
    if shape.eager_attention:
        per_pair_llm += layers * 2 * shape.heads * tokens * tokens * act
    sam_scale = (shape.sam_size / 1024) ** 2
    pixels = max(w * hh for w, hh in sizes) if sizes and loss_resolution == "full" else (shape.sam_size // 4) ** 2
    per_pair_loss = pixels * 48 + shape.sam_size**2 * 16 + 64 * 2**20 * sam_scale
    caches = 0.0
    if train.cache_frozen and (train.cache_on_device or not cuda):
        sam_feats = sum(c * (shape.sam_size // s) ** 2 for c, s in zip(SAM_FEATURE_CHANNELS, (4, 8, 16)))
        caches = sum(t * shape.image_tokens * h + sam_feats for t in tiles) * dtype_bytes
    if cuda and train.cache_on_device:
        caches += n_pairs * 2 * pixels + len(sizes) * (shape.sam_size // 4) ** 2 * 4  # uint8 masks, references
    vit_act = max(tiles) * shape.vit_tokens * shape.vit_hidden * 8 * dtype_bytes
    return MemoryModel(
        weights=total * dtype_bytes, train_weights=resident * dtype_bytes, trained_states=trained * 16,
        caches=caches, encode_per_image=vit_act + 0.25 * GIB * sam_scale, per_pair=per_pair_llm + per_pair_loss,
        overhead=1.0 * GIB if cuda else 0.25 * GIB, tokens=tokens,
        parts={"weights_gib": total * dtype_bytes / GIB, "per_pair_gib": (per_pair_llm + per_pair_loss) / GIB,
               "caches_gib": caches / GIB})


# --------------------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    micro_batch: int
    grad_accum: int
    pairs_per_step: int
    compile: bool
    rows: list[tuple[str, str, str]]  # (what, chosen, why) for the start-up table
    predicted_peak_gib: float | None = None


def memory_budget(device: torch.device, configured_gb: float | None) -> tuple[float, str]:
    """Bytes a run may use on its device, and where that figure comes from."""
    if configured_gb is not None:
        return configured_gb * GIB, f"train.memory_budget_gb {configured_gb:g}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.95 * free, f"95% of the free memory of {device} ({free / GIB:.1f} GiB)"
    available = _available_ram()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f", shared by {ranks} ranks" if ranks > 1 else ""
    return 0.8 * available / ranks, f"80% of the available RAM ({available / GIB:.1f} GiB{share})"


def _available_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_run(cfg: Any, device: torch.device, world_size: int, image_paths: list[str | Path],
             n_pairs: int) -> RunPlan:
    """Resolve train.micro_batch_size (auto) and train.compile (auto) for this device, before the
    model loads; refuse a memory budget that cannot hold micro-batch 1."""
    t = cfg.train
    pairs = t.pairs_per_step
    rows: list[tuple[str, str, str]] = []
    auto = t.micro_batch_size == "auto"
    check = auto or t.memory_budget_gb is not None  # an explicit split is checked only against an explicit budget
    micro = None if auto else int(t.micro_batch_size)
    accum = None if auto else int(t.grad_accum)
    peak = None
    if check:
        shape = read_shape(cfg.model.path)
        sizes = image_sizes(list(dict.fromkeys(str(p) for p in image_paths)))
        dtype_bytes = 4 if (cfg.model.dtype == "float32" or (cfg.model.dtype == "auto" and device.type != "cuda")) else 2
        model = memory_model(shape, t, cfg.lora.r, cfg.loss.resolution, device.type, dtype_bytes, world_size,
                             cfg.dist.strategy == "fsdp" and world_size > 1 and cfg.dist.fsdp_gather == "per_use",
                             sizes, n_pairs)
        budget, budget_from = memory_budget(device, t.memory_budget_gb)
        need_one = model.peak(1)
        if need_one > budget or (micro is not None and model.peak(micro) > budget):
            at = 1 if micro is None else micro
            key = "train.memory_budget_gb" if t.memory_budget_gb is not None else f"the memory of {device}"
            raise UserError(
                f"{key}: the run needs about {model.peak(at) / GIB:.1f} GiB at micro-batch {at} (memory model: "
                f"weights {model.weights / GIB:.1f} GiB, {model.per_pair / GIB:.2f} GiB per pair of "
                f"{model.tokens} tokens), more than the budget of {budget / GIB:.1f} GiB ({budget_from}); "
                "use smaller images, train.activation_checkpointing=true, or a device with more memory")
        if auto:
            micro = next(d for d in _divisors_descending(pairs) if model.peak(d) <= budget)
            accum = pairs // micro
            whole = "the whole step fits" if micro == pairs else f"micro-batch {_next_larger(pairs, micro)} would need {model.peak(_next_larger(pairs, micro)) / GIB:.1f} GiB"
            why = (f"auto on {device.type}: the largest divisor of train.pairs_per_step {pairs} that fits; "
                   f"memory model {model.peak(micro) / GIB:.1f} GiB of {budget / GIB:.1f} GiB ({budget_from}); "
                   f"{whole}; {model.tokens} tokens per pair, sizes from {shape.source}")
        else:
            why = (f"as configured; memory model {model.peak(micro) / GIB:.1f} GiB of {budget / GIB:.1f} GiB "
                   f"({budget_from})")
        peak = model.peak(micro) / GIB
    else:
        why = "as configured (train.micro_batch_size x train.grad_accum)"
    assert micro is not None and accum is not None
    total = micro * accum * world_size
    ranks = f" x {world_size} ranks = {total} pairs per optimizer step" if world_size > 1 else ""
    rows.append(("micro-batch", f"{micro} x accumulation {accum} = {micro * accum} pairs per rank{ranks}", why))
    if t.compile == "auto":
        compile_on = device.type == "cuda"
        rows.append(("compile", "per LLM layer" if compile_on else "off",
                     f"train.compile auto: {'on CUDA' if compile_on else 'eager on ' + device.type} "
                     "(train.compile=false turns it off)"))
    else:
        compile_on = bool(t.compile)
        rows.append(("compile", "per LLM layer" if compile_on else "off", f"train.compile {str(t.compile).lower()}"))
    return RunPlan(micro, accum, pairs, compile_on, rows, peak)


def _next_larger(pairs: int, micro: int) -> int:
    return min(d for d in _divisors_descending(pairs) if d > micro)


# --------------------------------------------------------------------------- compile


def compile_layers(layers: list[nn.Module], probe: Callable[[], None]) -> str | None:
    """torch.compile each layer (one graph, reused by every layer of the same shape), run
    `probe` (a forward and backward) so the compilation happens now, and on failure put the
    layers back to eager. Returns None, or the one-line reason compile was abandoned."""
    for layer in layers:
        layer.compile()
    try:
        probe()
    except Exception as err:  # compile errors come as many types (backend, Triton, C compiler)
        for layer in layers:
            layer._compiled_call_impl = None  # nn.Module.compile's wrapper: eager again
        torch._dynamo.reset()
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return f"{type(err).__name__}: {first}"
    return None


def _blocks(module: nn.Module | None, names: tuple[str, ...] = ("layers",)) -> list[nn.Module]:
    """The first non-empty ModuleList called one of `names` under module (a transformer's blocks)."""
    for sub in ([] if module is None else module.modules()):
        for name in names:
            blocks = getattr(sub, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return list(blocks)
    return []


def compile_for_inference(sa2va: Any, parts: tuple[str, ...] = ("llm",)) -> list[nn.Module]:
    """torch.compile the blocks of the forward path: the LLM's decoder layers ("llm"), the ViT's
    encoder layers ("vit"), SAM2's Hiera blocks ("sam"); one graph per block shape. Returns the
    compiled blocks (`block._compiled_call_impl = None` puts one back to eager)."""
    blocks: list[nn.Module] = []
    if "llm" in parts:
        blocks += _blocks(sa2va.llm)
    if "vit" in parts:  # InternViT: encoder.layers (the release) or encoder.layer
        blocks += _blocks(getattr(sa2va.model, "vision_model", None), ("layers", "layer"))
    sam: list[nn.Module] = []
    if "sam" in parts:  # Hiera: image_encoder.trunk(.backbone).blocks
        sam = _blocks(sa2va.sam2.image_encoder, ("blocks",))
        # Hiera's blocks take ~8 shapes (stage, window or global attention, pooling): static
        # graphs, one each (symbolic shapes cost more to compile here), all within the limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for block in blocks:
        block.compile()
    for block in sam:
        block.compile(dynamic=False)
    return blocks + sam


def probe_backward(policy: nn.Module, features: Any, sa2va: Any) -> None:
    """One forward and backward of a training micro-batch that changes nothing: random streams
    restored, gradients dropped (what compiles the layers before step 1)."""
    from .model import autocast

    was_training = policy.training
    policy.train()
    devices = [sa2va.device] if sa2va.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            with autocast(sa2va):
                logits = policy(features)
            logits.float().sum().backward()
    finally:
        policy.zero_grad(set_to_none=True)
        policy.train(was_training)


def print_plan(rows: list[tuple[str, str, str]]) -> None:
    """The start-up table of what the loop chose and why."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run plan")
    for col in ("setting", "chosen", "why"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)
