"""Loading a Sa2VA checkpoint, freezing and LoRA, and the one [SEG] -> mask forward.

Every checkpoint (the user's 26B or the project's tiny one) is reached the same way:
`AutoModel.from_pretrained(..., trust_remote_code=True)` and the release's public names.
Nothing here knows the tiny model's classes; every size is read from the checkpoint.

The forward that trains is the forward that predicts:
  prompt (template + image tokens + an answer holding [SEG]) -> LLM (teacher-forced)
  -> last hidden state at [SEG] -> text_hidden_fcs -> SAM2 heads -> low-res mask logits.
It is split in two: `encode_frozen` (ViT and SAM2 image encoder: depend only on the image
and frozen weights, so they can be cached) and `seg_logits` (everything that trains).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import compat, selfcheck
from .errors import UserError
from .families import Family, detect_family, get_module, set_module
from .families.internvl import IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES  # noqa: F401 - public names kept
from .hub import resolve_model_path
from .preprocess import sam_input

SEG = "[SEG]"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Sa2VA:
    """A loaded checkpoint and the facts about it that the forward needs.

    `family` is the adapter of its code family (sa2va.families); the fields after `dtype` are
    the facts it reads (InternVL: template and tiling; Qwen-VL: processor and pixel range)."""

    model: nn.Module
    tokenizer: Any
    path: Path
    family: Family
    seg_token_id: int
    sam_size: int
    device: torch.device
    dtype: torch.dtype
    sam_resample: int = Image.BICUBIC  # the filter predict_forward resizes the SAM2 input with
    img_context_token_id: int = -1  # the image token the vision features replace
    template: str = ""
    num_image_token: int = 0
    vit_size: int = 0
    min_tiles: int = 1
    max_tiles: int = 1
    use_thumbnail: bool = False
    dynamic_tiles: bool = False
    processor: Any = None
    min_pixels: int = 0
    max_pixels: int = 0
    prompt_cache: dict[tuple[Any, str, str], list[int]] = field(default_factory=dict)

    @property
    def sam2(self) -> nn.Module:
        return self.model.grounding_encoder.sam2_model

    @property
    def llm(self) -> nn.Module:
        """The LLM (LoRA goes on it): `language_model` (InternVL) or the Qwen-VL text model."""
        return get_module(self.model, self.family.llm_path)

    @llm.setter
    def llm(self, module: nn.Module) -> None:
        set_module(self.model, self.family.llm_path, module)

    @property
    def vision(self) -> nn.Module:
        """The frozen vision tower (it may leave the GPU once every image is encoded)."""
        return get_module(self.model, self.family.vision_path)

    @property
    def low_res(self) -> int:
        return self.sam_size // 4


# --------------------------------------------------------------------------- loading


def check_model_folder(path: str | Path, need_weights: bool = True) -> dict[str, Any]:
    """Check that `path` is a Sa2VA remote-code folder; name the missing file or field."""
    folder = resolve_model_path(path)  # a hub id (owner/name) -> its snapshot in the HF cache
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"model folder {folder} has no config.json: not a HuggingFace model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from err
    if config.get("model_type") != "sa2va_chat":
        raise UserError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'sa2va_chat'")
    auto_map = config.get("auto_map") or {}
    if "AutoModel" not in auto_map:
        raise UserError(f"{config_file}: auto_map has no AutoModel entry (not a Sa2VA remote-code folder)")
    for ref in {auto_map["AutoModel"], auto_map.get("AutoConfig", "")} - {""}:
        module = ref.split("--")[-1].rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise UserError(f"model folder {folder} is missing {module}.py (named by auto_map in config.json)")
    detect_family(config, config_file).check_config(folder, config)
    if need_weights and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"model folder {folder} has no weights ({' or '.join(WEIGHT_FILES[:2])})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model folder {folder} has no tokenizer files (tokenizer.json or tokenizer_config.json)")
    return config


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but torch sees no GPU")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_sa2va(path: str | Path, trust_remote_code: bool, device: str = "auto", dtype: str = "auto",
               random_weights: bool = False) -> Sa2VA:
    """Load a Sa2VA HF folder through AutoModel/AutoTokenizer and read its facts.

    random_weights=True builds the architecture of config.json with random weights instead
    (benchmarks at real shapes without real weights), directly on the device."""
    folder = resolve_model_path(path)
    config = check_model_folder(folder, need_weights=not random_weights)
    compat.check_llm_architecture(folder, config)
    code = ", ".join(sorted(p.name for p in folder.glob("*.py"))) or "its Python files"
    if not trust_remote_code:
        raise UserError(
            f"loading {folder} runs the Python code it ships ({code}) to build the model; "
            "if you trust it, set model.trust_remote_code=true (or pass --trust-remote-code)")
    from transformers import AutoConfig, AutoModel

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    compat.install_import_shims()
    print(f"trust_remote_code: building the model from the Python code in {folder} ({code})", flush=True)
    try:
        compat.ensure_post_init(folder, config["auto_map"]["AutoModel"])
        hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
        compat.repair_rope_scaling(hf_config)
        if random_weights:
            with dev:
                model = AutoModel.from_config(hf_config, trust_remote_code=True, dtype=torch_dtype)
        else:
            model = AutoModel.from_pretrained(str(folder), config=hf_config, trust_remote_code=True,
                                              dtype=torch_dtype)
    except ImportError as err:
        raise UserError(f"cannot import the remote code of {folder}: {err}") from err
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # torn weights, a file the remote code imports is missing: one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot load the model in {folder}: {type(err).__name__}: {first}") from err
    try:
        tokenizer = compat.load_tokenizer(folder, trust_remote_code)
    except ImportError as err:
        # Known breakage 5: InternLM2 tokenizer code (8B/26B) imports modules moved in 5.x.
        raise UserError(f"cannot load the tokenizer of {folder}: {err}. The InternLM2 tokenizer code of "
                        "Sa2VA-8B/26B imports modules that moved in transformers 5.x; "
                        "convert it to tokenizer.json or use a transformers version it supports") from err
    model.to(dev)
    model.eval()  # from_config builds in training mode; inference and frozen encoders want eval
    model._count = 0  # known breakage 3: the release's training forward reads it
    compat.fix_meta_buffers(model, dev)
    compat.restore_rotary_buffers(model)
    compat.use_sdpa_attention(model)  # the release's eager InternLM2 attention, fused
    compat.enable_generation(model)
    compat.fix_tied_weights_keys(model)
    compat.fix_sam2_device(model)

    family = detect_family(config, folder / "config.json")
    seg = tokenizer.convert_tokens_to_ids(SEG)
    if seg is None or seg == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer of {folder} has no {SEG} token: not a Sa2VA tokenizer")
    sa2va = Sa2VA(
        model=model,
        tokenizer=tokenizer,
        path=folder,
        family=family,
        seg_token_id=seg,
        sam_size=int(model.grounding_encoder.sam2_model.image_size),
        sam_resample=sam_resize_filter(config, folder),
        device=dev,
        dtype=torch_dtype,
        **family.facts(model, tokenizer, folder, config),
    )
    selfcheck.check_loaded(sa2va)
    return sa2va


SAM_RESIZE_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def sam_resize_filter(config: dict[str, Any], folder: Path) -> int:
    """How predict_forward resizes the image for SAM2. Every release family resizes with PIL's
    default filter (bicubic, its `DirectResize`); a folder may declare otherwise in config.json's
    `sam2_resize` (the project's own look-alikes say "bilinear", which their code uses)."""
    name = config.get("sam2_resize", "bicubic")
    if name not in SAM_RESIZE_FILTERS:
        raise UserError(f"{folder / 'config.json'}: sam2_resize is {name!r}; known: {', '.join(SAM_RESIZE_FILTERS)}")
    return SAM_RESIZE_FILTERS[name]


# --------------------------------------------------------------------------- freezing and LoRA


def add_lora_and_freeze(sa2va: Sa2VA, lora: Any, train_modules: Any) -> None:
    """Freeze everything, then: LoRA on the LLM's linear layers (not the output head),
    and train text_hidden_fcs / the SAM2 mask decoder / the vision projector (mlp1) as configured.

    Trained parameters are kept in float32 (master weights): at lr 1e-6 a bfloat16 weight
    cannot represent the update. Frozen weights stay in the load dtype.
    """
    from peft import LoraConfig, get_peft_model

    model = sa2va.model
    model.requires_grad_(False)
    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's rule: every Linear except the output head
    targets = compat.lora_targets(sa2va.llm, targets)  # q_proj ... down_proj also name InternLM2's
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, bias="none")
    projector = sa2va.family.projector(model)
    if train_modules.mlp1 and projector is None:
        raise UserError(f"config key train_modules.mlp1: the {sa2va.family.label} family has no trainable "
                        "vision projector in this suite; set it to false")
    try:
        sa2va.llm = get_peft_model(sa2va.llm, peft_config)
    except ValueError as err:
        raise UserError(f"config key lora.target_modules: {err}") from err
    trained: list[nn.Module] = []
    if train_modules.text_hidden_fcs:
        trained.append(model.text_hidden_fcs)
    if train_modules.mask_decoder:
        trained.append(model.grounding_encoder.sam2_model.sam_mask_decoder)
    if train_modules.mlp1:
        trained.append(projector)
    for module in trained:
        module.requires_grad_(True)
    # SAM2 runs these two projections inside forward_image, i.e. in the frozen, cacheable part.
    decoder = model.grounding_encoder.sam2_model.sam_mask_decoder
    for name in ("conv_s0", "conv_s1"):
        if hasattr(decoder, name):
            getattr(decoder, name).requires_grad_(False)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def parameter_table(model: nn.Module, family: Family | None = None) -> list[tuple[str, int, int]]:
    """(module, trained, frozen) parameter counts for the release's named parts."""
    if family is None:
        from .families.internvl import InternVLFamily

        family = InternVLFamily()
    groups = {
        **family.parameter_groups(),
        "text_hidden_fcs": "text_hidden_fcs.",
        "sam2 image_encoder": "grounding_encoder.sam2_model.image_encoder.",
        "sam2 sam_mask_decoder": "grounding_encoder.sam2_model.sam_mask_decoder.",
        "sam2 other": "grounding_encoder.",
    }
    counts = {name: [0, 0] for name in groups}
    counts["other"] = [0, 0]
    for name, param in model.named_parameters():
        group = next((g for g, prefix in groups.items() if name.startswith(prefix)), "other")
        counts[group][0 if param.requires_grad else 1] += param.numel()
    return [(name, t, f) for name, (t, f) in counts.items() if t + f > 0]


# --------------------------------------------------------------------------- inputs


@dataclass
class SegInputs:
    """Preprocessed images of a batch: what the frozen encoders take."""

    vit_pixels: Tensor  # vision-tower input rows (InternVL: (tiles, 3, vit, vit); Qwen-VL: (patches, D))
    tiles: list[int]  # rows of vit_pixels per sample
    sam_pixels: Tensor  # (B, 3, sam, sam), normalised by the model's preprocess_image
    sizes: list[tuple[int, int]]  # original (H, W) per sample
    layouts: list[Any] | None = None  # per sample, what sets the image tokens (None: the tile counts)

    def layout(self, i: int) -> Any:
        return self.tiles[i] if self.layouts is None else self.layouts[i]

    def pin_memory(self) -> "SegInputs":
        """Page-locked copies, so the copy to the GPU does not stage through pageable memory."""
        return SegInputs(self.vit_pixels.pin_memory(), self.tiles, self.sam_pixels.pin_memory(), self.sizes,
                         self.layouts)

    @staticmethod
    def cat(parts: list["SegInputs"]) -> "SegInputs":
        """Several prepared batches as one, in order (layouts kept: Qwen-VL's grids need them)."""
        with_layouts = any(p.layouts is not None for p in parts)
        return SegInputs(
            vit_pixels=torch.cat([p.vit_pixels for p in parts]),
            tiles=[t for p in parts for t in p.tiles],
            sam_pixels=torch.cat([p.sam_pixels for p in parts]),
            sizes=[s for p in parts for s in p.sizes],
            layouts=[p.layout(i) for p in parts for i in range(len(p.tiles))] if with_layouts else None,
        )


def prepare_images(sa2va: Sa2VA, images: list[np.ndarray]) -> SegInputs:
    """Turn uint8 RGB arrays into the vision-tower input and the SAM2 input, as predict_forward does."""
    rows, counts, layouts, sams = [], [], [], []
    for image in images:
        pixels, layout = sa2va.family.vision_input(sa2va, image)
        rows.append(pixels)
        counts.append(int(pixels.shape[0]))
        layouts.append(layout)
        sam = sam_input(image, sa2va.sam_size, sa2va.sam_resample)
        sams.append(sa2va.model.grounding_encoder.preprocess_image(sam))
    return SegInputs(
        vit_pixels=torch.cat(rows),
        tiles=counts,
        sam_pixels=torch.stack(sams),
        sizes=[(int(im.shape[0]), int(im.shape[1])) for im in images],
        layouts=layouts,
    )


def prompt_ids(sa2va: Sa2VA, tiles: Any, question: str, answer: str) -> list[int]:
    """Token ids of the family's prompt for one image (`tiles`: its layout, the tile count for
    InternVL, the patch grid for Qwen-VL) + the teacher-forced answer holding [SEG]."""
    key = (tiles, question, answer)
    if key not in sa2va.prompt_cache:
        ids = sa2va.family.prompt_ids(sa2va, tiles, question, answer)
        if ids.count(sa2va.seg_token_id) != 1:
            raise UserError(f"the answer {answer!r} must hold exactly one [SEG] token")
        sa2va.prompt_cache[key] = ids
    return sa2va.prompt_cache[key]


# --------------------------------------------------------------------------- the forward


@dataclass
class FrozenFeatures:
    """Per-batch outputs of the frozen encoders (depend only on the image and frozen weights)."""

    vit: Tensor  # vision features, rows per sample along dim 0: before the projector when it trains
    high_res: list[Tensor]  # SAM2 high-res features, (B, C_i, H_i, W_i)
    pix: Tensor  # (B, 256, h, w): lowest-res SAM2 features + no_mem_embed
    tiles: list[int]  # rows of `vit` per sample (InternVL: tiles; Qwen-VL: image tokens)
    sizes: list[tuple[int, int]]
    layouts: list[Any] | None = None  # per sample, what sets the prompt's image tokens (None: tiles)
    extra: list[Tensor] = field(default_factory=list)  # per-layer features with `vit`'s rows (deepstack)

    def layout(self, i: int) -> Any:
        return self.tiles[i] if self.layouts is None else self.layouts[i]

    def _rows(self, x: Tensor, indices: list[int]) -> Tensor:
        starts = np.concatenate([[0], np.cumsum(self.tiles)])
        return torch.cat([x[starts[i]:starts[i + 1]] for i in indices])

    def select(self, indices: list[int]) -> "FrozenFeatures":
        return FrozenFeatures(self._rows(self.vit, indices), [h[indices] for h in self.high_res], self.pix[indices],
                              [self.tiles[i] for i in indices], [self.sizes[i] for i in indices],
                              None if self.layouts is None else [self.layouts[i] for i in indices],
                              [self._rows(x, indices) for x in self.extra])

    def to(self, device: torch.device) -> "FrozenFeatures":
        return FrozenFeatures(self.vit.to(device, non_blocking=True),
                              [h.to(device, non_blocking=True) for h in self.high_res],
                              self.pix.to(device, non_blocking=True), self.tiles, self.sizes, self.layouts,
                              [x.to(device, non_blocking=True) for x in self.extra])

    @staticmethod
    def cat(parts: list["FrozenFeatures"]) -> "FrozenFeatures":
        layouts = None if all(p.layouts is None for p in parts) else [p.layout(i) for p in parts for i in range(len(p.tiles))]
        return FrozenFeatures(
            torch.cat([p.vit for p in parts]),
            [torch.cat([p.high_res[i] for p in parts]) for i in range(len(parts[0].high_res))],
            torch.cat([p.pix for p in parts]),
            [t for p in parts for t in p.tiles],
            [s for p in parts for s in p.sizes],
            layouts,
            [torch.cat([p.extra[i] for p in parts]) for i in range(len(parts[0].extra))],
        )


def projector_trained(sa2va: Sa2VA) -> bool:
    """True when the vision projector (InternVL's mlp1, Qwen-VL's vision merger) trains: features
    are cached before it."""
    projector = sa2va.family.projector(sa2va.model)
    return projector is not None and any(p.requires_grad for p in projector.parameters())


mlp1_trained = projector_trained  # the name the benchmark uses


@torch.no_grad()
def encode_frozen(sa2va: Sa2VA, inputs: SegInputs) -> FrozenFeatures:
    """Vision tower (+ projector when frozen) and the SAM2 image encoder: steps 1-4 of the release's path."""
    return encode_images(sa2va, inputs)


def encode_images(sa2va: Sa2VA, inputs: SegInputs) -> FrozenFeatures:
    """`encode_frozen` with gradients allowed (the baseline builder trains the image encoder)."""
    layouts = [inputs.layout(i) for i in range(len(inputs.tiles))]
    vit, rows, extra = sa2va.family.encode_vision(sa2va, inputs.vit_pixels, layouts,
                                                  with_projector=not projector_trained(sa2va))
    sam2 = sa2va.sam2
    images = inputs.sam_pixels.to(sa2va.device, sa2va.dtype)
    feats = sam2.forward_image(images)
    _, vision_feats, _, feat_sizes = sam2._prepare_backbone_features(feats)
    batch = images.shape[0]
    high_res = [
        x.permute(1, 2, 0).reshape(batch, -1, h, w) for x, (h, w) in zip(vision_feats[:-1], feat_sizes[:-1])
    ]
    h, w = feat_sizes[-1]
    pix = (vision_feats[-1] + sam2.no_mem_embed).permute(1, 2, 0).reshape(batch, -1, h, w)
    return FrozenFeatures(vit, high_res, pix, rows, list(inputs.sizes), inputs.layouts, extra)


def seg_logits(sa2va: Sa2VA, features: FrozenFeatures, question: str, answer: str) -> Tensor:
    """The trainable part: LLM (teacher-forced) -> [SEG] state -> text_hidden_fcs -> SAM2 heads.

    Returns low-res mask logits (B, 1, sam/4, sam/4). Runs with or without gradients.
    """
    return sam_heads(sa2va, features, question, answer)[3]


def sam_heads(sa2va: Sa2VA, features: FrozenFeatures, question: str, answer: str) -> tuple:
    """`seg_logits`, returning SAM2's whole `_forward_sam_heads` tuple: (low-res multimask logits
    (B, K, h, w), high-res multimasks, predicted IoUs (B, K), the chosen low-res mask (B, 1, h, w),
    ...). The baseline builder trains the IoU head with it."""
    model = sa2va.model
    device = sa2va.device
    batch = len(features.tiles)
    sequences = [prompt_ids(sa2va, features.layout(i), question, answer) for i in range(batch)]
    length = max(len(s) for s in sequences)
    pad = sa2va.tokenizer.pad_token_id or 0
    input_ids = torch.full((batch, length), pad, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    for i, seq in enumerate(sequences):  # right padding keeps positions of real tokens 0..n-1
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)

    vit = features.vit.to(device)
    if projector_trained(sa2va):
        vit = sa2va.family.project(sa2va, vit)
    hidden = sa2va.family.llm_hidden(sa2va, input_ids, attention, vit, features)
    seg_pos = (input_ids == sa2va.seg_token_id).int().argmax(dim=1)
    seg_hidden = hidden[torch.arange(batch, device=device), seg_pos]
    seg_embedding = model.text_hidden_fcs(seg_hidden)  # only the [SEG] rows go through it

    sam2 = sa2va.sam2
    return sam2._forward_sam_heads(
        backbone_features=features.pix.to(device),
        point_inputs=None,
        mask_inputs=None,
        high_res_features=[h.to(device) for h in features.high_res],
        multimask_output=sam2._use_multimask(True, None),
        language_embd=seg_embedding[:, None],
    )


def upsample_logits(low_res: Tensor, sam_size: int, size: tuple[int, int]) -> Tensor:
    """Low-res logits (N, 1, h, w) -> (N, 1, H, W) as predict_forward does: bilinear to the
    SAM2 input size, then bilinear to the original image size."""
    x = F.interpolate(low_res.float(), size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def autocast(sa2va: Sa2VA) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, unless the model was loaded in float32 (model.dtype=float32,
    evaluate.py --dtype float32): then the whole forward runs in float32."""
    if sa2va.device.type == "cuda" and sa2va.dtype != torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_probabilities(
    sa2va: Sa2VA, images: list[np.ndarray], batch_size: int = 4,
    question: str = "Please segment the blood vessels.", answer: str = "It is [SEG].",
) -> list[np.ndarray]:
    """Foreground probability (float32, H x W at each image's size) from the training forward.

    On CUDA the host never waits for the GPU to drain: a chunk's probabilities are read back
    only after the next chunk's work is queued behind them."""
    from .pipeline import prepared_chunks, to_device  # CPU preprocessing in threads, a chunk ahead

    out: list[np.ndarray] = []
    queued: list[tuple[list[Tensor], Any]] = []  # (probabilities on their way to the host, done event)
    for _, inputs in prepared_chunks(sa2va, images, batch_size):
        with autocast(sa2va):
            features = encode_frozen(sa2va, to_device(inputs, sa2va.device))
            low = seg_logits(sa2va, features, question, answer)
        probs = [torch.sigmoid(upsample_logits(low[i: i + 1], sa2va.sam_size, size))[0, 0].float()
                 for i, size in enumerate(features.sizes)]
        if sa2va.device.type == "cuda":
            host = [p.to("cpu", non_blocking=True) for p in probs]  # page-locked, filled in stream order
            done = torch.cuda.Event()
            done.record()
            queued.append((host, done))
        else:
            queued.append((probs, None))
        if len(queued) > 1:
            out += _read_back(*queued.pop(0))
    for host, done in queued:
        out += _read_back(host, done)
    return out


def _read_back(probs: list[Tensor], done: Any) -> list[np.ndarray]:
    if done is not None:
        done.synchronize()
    return [p.numpy().copy() for p in probs]  # copied: page-locked memory is not held by callers


class SegPolicy(nn.Module):
    """The trained part of Sa2VA as one module, so DDP/FSDP can wrap exactly what trains.

    Its children are the model's own modules (shared, not copied); forward is `seg_logits`.
    Frozen modules used only by `encode_frozen` (ViT, SAM2 image encoder) are not children,
    so FSDP never shards them and DDP never sees them.
    """

    def __init__(self, sa2va: Sa2VA, question: str, answer: str):
        super().__init__()
        family = sa2va.family
        self.language_model = sa2va.llm
        self.text_hidden_fcs = sa2va.model.text_hidden_fcs
        self.mask_decoder = sa2va.sam2.sam_mask_decoder
        # Policy child name -> name of the same module inside the Sa2VA model (checkpoints and
        # the export use the model's names; optimizer state uses these).
        self.model_prefix = {
            "language_model.": family.llm_path + ".",
            "text_hidden_fcs.": "text_hidden_fcs.",
            "mask_decoder.": "grounding_encoder.sam2_model.sam_mask_decoder.",
        }
        if projector_trained(sa2va):
            self.mlp1 = family.projector(sa2va.model)  # the vision projector: InternVL's mlp1, Qwen-VL's merger
            self.model_prefix["mlp1."] = f"{family.projector_path}."
        self._sa2va = [sa2va]  # a list hides it from nn.Module's registry
        self.question, self.answer = question, answer

    def forward(self, features: FrozenFeatures) -> Tensor:
        return seg_logits(self._sa2va[0], features, self.question, self.answer)

    def decoder_layers(self) -> list[nn.Module]:
        """The LLM's transformer blocks (FSDP2 shards each one separately)."""
        for module in self.language_model.modules():
            layers = getattr(module, "layers", None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return list(layers)
        return []

    def to_model_name(self, name: str) -> str:
        for prefix, target in self.model_prefix.items():
            if name.startswith(prefix):
                return target + name[len(prefix):]
        raise KeyError(name)

    def from_model_name(self, name: str) -> str:
        for prefix, target in self.model_prefix.items():
            if name.startswith(target):
                return prefix + name[len(target):]
        raise KeyError(name)


def freeze_unreachable(policy: SegPolicy, features: FrozenFeatures, sa2va: Sa2VA) -> list[str]:
    """Freeze trained parameters that no mask loss can reach, and return their names.

    SAM2's IoU head and object-score head only pick or gate masks (argmax, > 0): no gradient
    flows to them from a loss on the mask logits. Training them would be a no-op, and DDP
    would wait for their gradients forever. One probe backward finds them on any checkpoint.
    """
    devices = [sa2va.device] if sa2va.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the probe must not move the RNG streams
        with autocast(sa2va):
            logits = policy(features)
        logits.float().sum().backward()
    unreachable = []
    for name, param in policy.named_parameters():
        if param.requires_grad and param.grad is None:
            param.requires_grad_(False)
            unreachable.append(name)
        param.grad = None
    return unreachable
