"""Native resolution through overlapping tiles.

Sa2VA squeezes every image into SAM2's square input (1024 px on the release, 512 on the tiny
checkpoint) and predicts logits on a grid a quarter of that side (256 or 128). A vessel thinner
than one cell of that grid is lost, whatever the training. Tiling cuts the image into
overlapping square tiles of `tiling.size` pixels, sends every tile through the very same [SEG]
forward (batched, the frozen encoders once per tile), and blends the tile logits back at the
image's own resolution with a smooth window, so no seam shows. A tile no larger than the
logit grid (`tiling.size: auto` = the model's `low_res`) has at least one logit per pixel.

The pieces, used by training, curation and both evaluation paths alike:
  `Tiling` / `resolve`      the tile side and overlap (auto read from the loaded model)
  `layout`                  where the tiles of one image lie (they cover it exactly)
  `crops`                   the tile crops of an image or a mask
  `window`                  the blending weight of one tile
  `assemble` / `blend`      low-res tile logits -> logits at native resolution
  `predict_probabilities`   the forward path over tiles (off: model.predict_probabilities)
  `tile_pairs`              training pairs cut into tile pairs, masks alike
  `ceiling_mask`            what a perfect model at the logit resolution can give
See docs/resolution.md.

torch is imported inside the functions that compute: the geometry and the key checks load without
it, so a command that only validates its arguments (or curates without a model) starts at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

MIN_TILE = 32  # below this a tile holds too little context for the ViT and SAM2 to see a vessel
# The release's SAM2 input side (hard-coded in its remote code, absent from config.json): its
# logit grid is a quarter of it, 1024 -> 256.
RELEASE_SAM_SIZE = 1024

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end exclusive


@dataclass(frozen=True)
class Tiling:
    size: int  # tile side in pixels
    overlap: int  # pixels shared by neighbouring tiles (at least; tiles are spread evenly)


def check_tiling(size: Any, overlap: Any, size_key: str = "tiling.size", overlap_key: str = "tiling.overlap",
                 prefix: str = "config key ") -> None:
    """Refuse impossible values, naming the key: config keys, or flags with prefix=""."""
    if size is None:
        return
    what = f"{prefix}{size_key} must be a number of pixels, auto, or null (off); got {size!r}"
    if isinstance(size, str):
        if size != "auto":
            raise UserError(what)
    elif isinstance(size, bool) or not isinstance(size, int):
        raise UserError(what)
    elif size < MIN_TILE:
        raise UserError(f"{prefix}{size_key} must be at least {MIN_TILE} px, got {size}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise UserError(f"{prefix}{overlap_key} must be a whole number of pixels >= 0, got {overlap!r}")
    if isinstance(size, int) and 2 * overlap >= size:
        raise UserError(f"{prefix}{overlap_key} must be less than half of {size_key} ({size} px), got {overlap}")


def parse_size(text: str | None) -> int | str | None:
    """A --tile-size argument: pixels, auto, or off/None."""
    if text is None or text.lower() in ("off", "none", "null"):
        return None
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--tile-size must be a number of pixels, auto or off, got {text!r}") from None


def resolve(size: int | str | None, overlap: int, low_res: int, size_key: str = "tiling.size",
            overlap_key: str = "tiling.overlap", prefix: str = "config key ") -> Tiling | None:
    """The tiling for a model whose logit grid is low_res x low_res; None = off.

    auto: tiles of low_res pixels, so the logit grid is at least as fine as the image."""
    check_tiling(size, overlap, size_key, overlap_key, prefix)
    if size is None:
        return None
    side = low_res if size == "auto" else int(size)
    if 2 * overlap >= side:
        raise UserError(f"{prefix}{overlap_key} must be less than half of the tile side ({side} px, "
                        f"{size_key}={size} for this model), got {overlap}")
    return Tiling(side, overlap)


def from_config(tiling_cfg: Any, sa2va: Any) -> Tiling | None:
    """`resolve` for a run config's `tiling` section and a loaded model."""
    return resolve(tiling_cfg.size, tiling_cfg.overlap, sa2va.low_res)


def axis_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis: the first at 0, the last ending at `length`, the
    rest spread evenly, so neighbours share at least `overlap` pixels."""
    if length <= size:
        return [0]
    step = size - overlap
    n = math.ceil((length - size) / step) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class Layout:
    """The tiles of one image. Untiled (or an image within one tile): one box, the whole image."""

    height: int
    width: int
    boxes: tuple[Box, ...]
    overlap: int

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


def layout(height: int, width: int, tiling: Tiling | None) -> Layout:
    if tiling is None:
        return Layout(height, width, ((0, height, 0, width),), 0)
    ys = axis_starts(height, tiling.size, tiling.overlap)
    xs = axis_starts(width, tiling.size, tiling.overlap)
    boxes = tuple((y, min(y + tiling.size, height), x, min(x + tiling.size, width)) for y in ys for x in xs)
    return Layout(height, width, boxes, tiling.overlap)


def crops(array: np.ndarray, lay: Layout) -> list[np.ndarray]:
    """The tile crops of an image (H, W, 3) or a mask (H, W), contiguous."""
    return [np.ascontiguousarray(array[y0:y1, x0:x1]) for y0, y1, x0, x1 in lay.boxes]


def _ramp(n: int, start: int, end: int, length: int, overlap: int) -> np.ndarray:
    """1-D weight of a tile spanning [start, end) of an axis of `length`: a raised-cosine rise
    over `overlap` pixels on each side that has a neighbour, 1 elsewhere (never 0, so every
    pixel keeps a weight)."""
    w = np.ones(n, np.float64)
    if overlap <= 0:
        return w
    k = min(overlap, n)
    rise = np.sin(0.5 * math.pi * (np.arange(k) + 0.5) / overlap) ** 2
    if start > 0:
        w[:k] = np.minimum(w[:k], rise)
    if end < length:
        w[n - k:] = np.minimum(w[n - k:], rise[::-1])
    return w


def window(box: Box, lay: Layout) -> np.ndarray:
    """The blending weight of one tile (h, w): smooth, positive, 1 away from its neighbours."""
    y0, y1, x0, x1 = box
    return np.outer(_ramp(y1 - y0, y0, y1, lay.height, lay.overlap),
                    _ramp(x1 - x0, x0, x1, lay.width, lay.overlap))


def blend(tiles: list[Tensor], lay: Layout) -> Tensor:
    """Tile maps (each (h, w) at its box's size) -> (H, W), the window-weighted mean.

    Where only one tile covers a pixel this is that tile's value; a constant stays constant."""
    import torch

    if len(tiles) == 1:
        return tiles[0].float()
    device = tiles[0].device
    num = torch.zeros(lay.size, dtype=torch.float32, device=device)
    den = torch.zeros(lay.size, dtype=torch.float32, device=device)
    for value, box in zip(tiles, lay.boxes):
        y0, y1, x0, x1 = box
        w = torch.from_numpy(window(box, lay)).to(device, torch.float32)
        num[y0:y1, x0:x1] += w * value.float()
        den[y0:y1, x0:x1] += w
    return num / den


def assemble(low: Tensor, sam_size: int, lay: Layout) -> Tensor:
    """Low-res logits of one image's tiles (n, 1, h, w) -> logits (H, W) at native resolution.

    Each tile is upsampled as predict_forward upsamples a whole image (`upsample_logits`), then
    the tiles are blended. With one box this is exactly the untiled upsampling."""
    from .model import upsample_logits

    maps = [upsample_logits(low[i : i + 1], sam_size, (y1 - y0, x1 - x0))[0, 0]
            for i, (y0, y1, x0, x1) in enumerate(lay.boxes)]
    return blend(maps, lay)


def tiled_logits(sa2va: Any, images: list[np.ndarray], tiling: Tiling, logits_fn: Callable[[Any], Tensor],
                 batch_size: int) -> list[Tensor]:
    """Full-resolution logits (H, W) of each image: every tile through encode_frozen and
    `logits_fn` (the trainable forward), `batch_size` tiles at a time, then blended. Tiles are
    prepared in threads a chunk ahead and copied without a wait, as the untiled forward does."""
    import torch

    from .model import autocast, encode_frozen
    from .pipeline import prepared_chunks, to_device

    lays = [layout(im.shape[0], im.shape[1], tiling) for im in images]
    pieces = [c for im, lay in zip(images, lays) for c in crops(im, lay)]
    lows = []
    for _, inputs in prepared_chunks(sa2va, pieces, batch_size):
        with autocast(sa2va):
            features = encode_frozen(sa2va, to_device(inputs, sa2va.device))
            lows.append(logits_fn(features).float())
    low = torch.cat(lows)
    out, at = [], 0
    for lay in lays:
        n = len(lay.boxes)
        out.append(assemble(low[at : at + n], sa2va.sam_size, lay))
        at += n
    return out


def predict_probabilities(sa2va: Any, images: list[np.ndarray], tiling: Tiling | None, batch_size: int = 4,
                          question: str = "Please segment the blood vessels.",
                          answer: str = "It is [SEG].") -> list[np.ndarray]:
    """Foreground probability (H x W float32) of each image; tiling None = today's untiled path."""
    import torch

    from .model import predict_probabilities as untiled, seg_logits

    with torch.inference_mode():
        if tiling is None:
            return untiled(sa2va, images, batch_size=batch_size, question=question, answer=answer)
        logits = tiled_logits(sa2va, images, tiling, lambda f: seg_logits(sa2va, f, question, answer), batch_size)
        return [torch.sigmoid(z).cpu().numpy().astype(np.float32) for z in logits]


def blend_masks(masks: list[np.ndarray], lay: Layout) -> np.ndarray:
    """Binary tile masks (e.g. predict_forward's, per tile) -> one mask: window-weighted vote."""
    import torch

    if len(masks) == 1:
        return masks[0].astype(bool)
    votes = blend([torch.from_numpy(m.astype(np.float32)) for m in masks], lay)
    return (votes > 0.5).numpy()


def tile_pairs(samples: list[dict[str, Any]], keys: list[str], tiling: Tiling) -> tuple[list[dict], list[str]]:
    """Training pairs -> one pair per tile: image, chosen and rejected masks cut alike.

    `keys` name each pair's image; a tile's key adds its box, so tiles of an image that several
    pairs share are encoded once. The curation gap rule was applied per whole image and is
    not re-applied per tile (docs/resolution.md)."""
    out, out_keys = [], []
    for sample, key in zip(samples, keys):
        image = sample["image"]
        lay = layout(image.shape[0], image.shape[1], tiling)
        for box, im, ch, rj in zip(lay.boxes, crops(image, lay), crops(sample["chosen"], lay),
                                   crops(sample["rejected"], lay)):
            out.append({**sample, "image": im, "chosen": ch, "rejected": rj, "tile": box})
            out_keys.append(f"{key}#{box[0]},{box[2]}" if len(lay.boxes) > 1 else key)
    return out, out_keys


def ceiling_mask(mask: np.ndarray, low_res: int, sam_size: int, tiling: Tiling | None) -> np.ndarray:
    """The best mask a model with a low_res x low_res logit grid can give: each tile (or the
    whole image) of the true mask area-averaged onto the grid, upsampled as the forward
    upsamples logits, blended, thresholded at 0.5."""
    import torch
    import torch.nn.functional as F

    lay = layout(mask.shape[0], mask.shape[1], tiling)
    lows = [F.interpolate(torch.from_numpy(c.astype(np.float32))[None, None], size=(low_res, low_res),
                          mode="area") for c in crops(mask, lay)]
    return (assemble(torch.cat(lows), sam_size, lay) > 0.5).numpy()


def sam_size_of(folder: Any) -> tuple[int, str]:
    """SAM2 input side of a model folder, read from config.json without loading the model,
    and where it came from. The release does not write it (its remote code fixes 1024)."""
    import json
    from pathlib import Path

    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {config_file}: {err}") from err
    side = (config.get("sam2_config") or {}).get("image_size") if isinstance(config, dict) else None
    if isinstance(side, int) and side > 0:
        return side, f"{config_file} (sam2_config.image_size)"
    return RELEASE_SAM_SIZE, f"{config_file} has no sam2_config.image_size: the release's SAM2 input"


def generate_tiled(generate: Callable[[np.ndarray], tuple[np.ndarray, str, int]], image: np.ndarray,
                   tiling: Tiling | None) -> tuple[np.ndarray, str, int]:
    """The generate path over tiles: `generate` (predict_forward on one image -> mask, text,
    number of [SEG]) on every tile, masks blended by window-weighted vote. Returns the mask,
    the text of the first tile that wrote no [SEG] (else of the first tile), and the number of
    [SEG] of the tile that wrote the fewest (0 = some tile segmented nothing)."""
    lay = layout(image.shape[0], image.shape[1], tiling)
    outs = [generate(c) for c in crops(image, lay)]
    if len(outs) == 1:
        return outs[0]
    texts = [t for _, t, n in outs if n == 0] or [outs[0][1]]
    return blend_masks([m for m, _, _ in outs], lay), texts[0], min(n for _, _, n in outs)
