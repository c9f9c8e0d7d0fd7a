"""One small adapter per Sa2VA code family, behind one interface.

The release ships two code families that reach the same [SEG] -> SAM2 heads through different
vision-language models:
  internvl  `Sa2VAChatModel` (InternViT + mlp1 + an LLM: Qwen2 for 1B/4B and InternVL3-2B/8B/14B,
            InternLM2 for 8B/26B): 448 px tiles, `<IMG_CONTEXT>` tokens, a text template.
  qwen_vl   `Sa2VAChatModelQwen` (transformers' own Qwen2.5-VL or Qwen3-VL, "codebase v2"):
            Qwen's dynamic resolution through the checkpoint's processor, `<|image_pad|>` tokens,
            M-RoPE positions from the image grid.
Everything that differs lives in a `Family`; sa2va.model keeps the one forward (prepare ->
frozen encoders -> LLM -> [SEG] -> text_hidden_fcs -> SAM2 heads) and calls the adapter for
the family-specific steps. The family is read from config.json (auto_map's config class, the
config's fields), never from a folder name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from torch import Tensor, nn

from ..errors import UserError

if TYPE_CHECKING:  # model.py imports this package; only the type names are needed here
    from ..model import FrozenFeatures, Sa2VA


def get_module(root: nn.Module, path: str) -> nn.Module:
    """root.a.b.c for path "a.b.c"."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


@contextlib.contextmanager
def swapped(root: nn.Module, path: str, replacement: nn.Module) -> Iterator[None]:
    """root.<path> replaced by `replacement` for the duration (the vision encoders run without
    the projector while the projector trains)."""
    original = get_module(root, path)
    set_module(root, path, replacement)
    try:
        yield
    finally:
        set_module(root, path, original)


class Family:
    """What one Sa2VA code family does differently. Subclasses set the class attributes and
    implement the methods; an instance lives in `Sa2VA.family` (stateless: facts about the
    loaded checkpoint live in the Sa2VA record)."""

    name: str = ""  # short id, e.g. "internvl"
    label: str = ""  # for messages and docs
    config_classes: tuple[str, ...] = ()  # auto_map AutoConfig class names that mean this family
    llm_path: str = ""  # dotted path of the LLM in the Sa2VA model (LoRA goes on it)
    vision_path: str = ""  # the frozen vision tower (may leave the GPU once features are cached)
    # The vision -> LLM projector that train_modules.mlp1 trains (InternVL: mlp1; Qwen-VL: the
    # vision merger), if any. When it trains, the frozen cache stops before it and `project` runs it.
    projector_path: str | None = None

    # ---- detection and folder checks
    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        raise NotImplementedError

    def check_config(self, folder: Path, config: dict[str, Any]) -> None:
        """Refuse (UserError naming the file and key) a config.json this family cannot use."""
        raise NotImplementedError

    # ---- loading
    def facts(self, model: nn.Module, tokenizer: Any, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Sa2VA fields this family reads from the loaded checkpoint (token ids, sizes, processor)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, str]:
        """Display name -> parameter-name prefix in the Sa2VA model, for the parameter table."""
        raise NotImplementedError

    # ---- the forward
    def vision_input(self, sa2va: "Sa2VA", image: np.ndarray) -> tuple[Tensor, Any]:
        """One uint8 RGB image -> (pixel rows for the vision tower, layout). The layout says how
        many image tokens the prompt holds (InternVL: tiles; Qwen-VL: the (t, h, w) patch grid)."""
        raise NotImplementedError

    def encode_vision(self, sa2va: "Sa2VA", pixels: Tensor, layouts: list[Any],
                      with_projector: bool) -> tuple[Tensor, list[int], list[Tensor]]:
        """The frozen vision encoding of a batch: (features, feature rows per sample, extra
        per-layer features aligned with the rows (Qwen3-VL deepstack; else empty)).
        with_projector=False leaves the trained projector out: the rows are then what `project`
        takes (it runs in the trained part, `seg_logits`)."""
        raise NotImplementedError

    def prompt_ids(self, sa2va: "Sa2VA", layout: Any, question: str, answer: str) -> list[int]:
        """Token ids of the prompt as predict_forward builds it, plus the teacher-forced answer."""
        raise NotImplementedError

    def llm_hidden(self, sa2va: "Sa2VA", input_ids: Tensor, attention: Tensor, image_embeds: Tensor,
                   features: "FrozenFeatures") -> Tensor:
        """Last-layer hidden states (B, L, H) of the LLM, image embeddings placed at the image
        tokens (right-padded batch)."""
        raise NotImplementedError

    def generate_kwargs(self, sa2va: "Sa2VA") -> dict[str, Any]:
        """Keyword arguments predict_forward needs besides image and text."""
        return {"tokenizer": sa2va.tokenizer}

    # ---- shared helpers
    def projector(self, model: nn.Module) -> nn.Module | None:
        return get_module(model, self.projector_path) if self.projector_path else None

    def project(self, sa2va: "Sa2VA", vit: Tensor) -> Tensor:
        """The trained projector on rows `encode_vision(with_projector=False)` returned."""
        return self.projector(sa2va.model)(vit)

    def scatter_images(self, embeds: Tensor, input_ids: Tensor, token_id: int, image_embeds: Tensor) -> Tensor:
        """Overwrite the embeddings at the image-token positions with the image features."""
        mask = input_ids == token_id
        if int(mask.sum()) != image_embeds.shape[0]:
            raise RuntimeError(f"{int(mask.sum())} image tokens in the prompt but {image_embeds.shape[0]} image features")
        return embeds.masked_scatter(mask[..., None], image_embeds.to(embeds.dtype))


def _families() -> tuple[type[Family], ...]:
    from .internvl import InternVLFamily
    from .qwen_vl import QwenVLFamily

    return (InternVLFamily, QwenVLFamily)


def config_class_name(config: dict[str, Any]) -> str:
    ref = (config.get("auto_map") or {}).get("AutoConfig", "")
    return ref.split("--")[-1].rsplit(".", 1)[-1] if ref else "(no auto_map AutoConfig)"


def detect_family(config: dict[str, Any], config_file: Path) -> Family:
    """The family of a config.json, or a one-line refusal naming what was found."""
    for cls in _families():
        if cls.matches(config):
            return cls()
    supported = "; ".join(f"{c.name} ({c.label}: {', '.join(c.config_classes)})" for c in _families())
    raise UserError(f"{config_file}: unknown Sa2VA family: config class {config_class_name(config)} "
                    f"(architectures {config.get('architectures')}); supported: {supported}")


def supported_families() -> list[type[Family]]:
    return list(_families())
