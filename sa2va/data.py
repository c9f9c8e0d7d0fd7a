"""Data sets on disk: preference pairs (the seed's layout) and plain image folders.

Pairs: ROOT/dpo_annotations.json = [{"image": "images/x.png", "chosen_mask": "...",
"rejected_mask": "..."}, ...], paths relative to ROOT. Every entry is checked when the data
set is opened (keys, paths inside ROOT, files present), so a bad file stops the run before
any GPU time is spent, naming the entry.

Image folders: ROOT/images/NAME.(png|jpg|...), ROOT/masks/NAME.png, optional ROOT/fov/NAME.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import UserError
from .fileio import read_mask, read_rgb, safe_join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PAIR_KEYS = ("image", "chosen_mask", "rejected_mask")


@dataclass
class PairEntry:
    id: str
    image: Path
    chosen: Path
    rejected: Path


def read_pairs(root: str | Path, annotations: str = "dpo_annotations.json",
               max_samples: int | None = None) -> list[PairEntry]:
    root_path = Path(root)
    file = root_path / annotations
    if not file.is_file():
        raise UserError(f"pair file {file} not found (data.root={root}); "
                        "`python curate_data.py --data DIR --min-gap 0.15` makes one")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise UserError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{file} must hold a non-empty list of pairs")
    entries: list[PairEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{file} entry {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where} is not an object")
        missing = [k for k in PAIR_KEYS if k not in item]
        if missing:
            raise UserError(f"{where} has no {', '.join(missing)}")
        paths = {k: safe_join(root_path, item[k], f"{where} {k}") for k in PAIR_KEYS}
        for key, path in paths.items():
            if not path.is_file():
                raise UserError(f"{where} {key}: file {item[key]} not found under {root_path}")
        pair_id = str(item.get("id") or f"{Path(item['image']).stem}#{i}")
        if pair_id in seen:
            raise UserError(f"{where}: duplicate id {pair_id!r}")
        seen.add(pair_id)
        entries.append(PairEntry(pair_id, paths["image"], paths["chosen_mask"], paths["rejected_mask"]))
    if max_samples is not None:
        entries = entries[:max_samples]
    return entries


class PairDataset(Dataset):
    """Yields raw arrays; the model-specific preprocessing happens in the training loop.

    Every image and mask is read and checked here, when the data set is made (before any
    model is loaded), and kept: a truncated PNG or a wrong-size mask stops the run at once,
    not after a long model load. An image shared by several pairs is read once.
    """

    def __init__(self, entries: list[PairEntry]):
        self.entries = entries
        images: dict[Path, np.ndarray] = {}
        self.items = [self._load(i, images) for i in range(len(entries))]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    def _load(self, index: int, images: dict[Path, np.ndarray]) -> dict[str, Any]:
        entry = self.entries[index]
        if entry.image not in images:
            images[entry.image] = read_rgb(entry.image)
        image = images[entry.image]
        chosen = read_mask(entry.chosen)
        rejected = read_mask(entry.rejected)
        for name, mask in (("chosen mask", chosen), ("rejected mask", rejected)):
            if mask.shape != image.shape[:2]:
                path = entry.chosen if name == "chosen mask" else entry.rejected
                raise UserError(f"{name} {path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{entry.image} is {image.shape[1]}x{image.shape[0]}")
        return {"index": index, "id": entry.id, "image": image, "chosen": chosen, "rejected": rejected}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: [item[key] for item in items] for key in items[0]}


@dataclass
class ImageEntry:
    name: str
    image: Path
    mask: Path | None
    fov: Path | None


def list_image_folder(root: str | Path, need_masks: bool = True, ids: list[str] | None = None) -> list[ImageEntry]:
    """Entries of ROOT/images with their masks (and FOV masks where present), sorted by name."""
    root_path = Path(root)
    images_dir = root_path / "images"
    if not images_dir.is_dir():
        raise UserError(f"data folder {root_path} has no images/ folder")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if ids is not None:
        wanted = set(ids)
        files = [p for p in files if p.stem in wanted]
        missing = wanted - {p.stem for p in files}
        if missing:
            raise UserError(f"{images_dir}: no image for ids {', '.join(sorted(missing)[:5])}")
    if not files:
        raise UserError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    entries = []
    for path in files:
        mask = root_path / "masks" / f"{path.stem}.png"
        if not mask.is_file():
            if need_masks:
                raise UserError(f"image {path} has no mask {mask}")
            mask = None
        fov = root_path / "fov" / f"{path.stem}.png"
        entries.append(ImageEntry(path.stem, path, mask, fov if fov.is_file() else None))
    return entries


def load_image_entry(entry: ImageEntry) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    image = read_rgb(entry.image)
    masks = []
    for path in (entry.mask, entry.fov):
        if path is None:
            masks.append(None)
            continue
        mask = read_mask(path)
        if mask.shape != image.shape[:2]:
            raise UserError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {entry.image} "
                            f"is {image.shape[1]}x{image.shape[0]}")
        masks.append(mask)
    return image, masks[0], masks[1]


def masks_to_tensor(masks: list[np.ndarray], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool masks -> float (B, 1, H, W); with `size`, nearest-resized (the official recipe)."""
    out = []
    for mask in masks:
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        if size is not None and tuple(t.shape[-2:]) != size:
            t = torch.nn.functional.interpolate(t, size=size, mode="nearest")
        out.append(t[0])
    return torch.stack(out)
