"""Data sets on disk: preference pairs (the seed's layout) and plain image folders.

Pairs: ROOT/dpo_annotations.json = [{"image": "images/x.png", "chosen_mask": "...",
"rejected_mask": "..."}, ...], paths relative to ROOT. Every entry is checked when the data
set is opened (keys, paths inside ROOT, files present), so a bad file stops the run before
any GPU time is spent, naming the entry.

Image folders: ROOT/images/NAME.(png|jpg|tif|ppm|...), ROOT/masks/NAME.(png|gif|tif|...), optional
ROOT/fov/NAME.* and ROOT/masks_2nd/NAME.* (a second observer), as sa2va.datasets writes them.
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
from .fileio import safe_join
from .imageio import (IMAGE_SUFFIXES, MASK_SUFFIXES, check_same_size, find_named, image_files, read_image, read_mask,
                      stem_index)

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
            images[entry.image] = read_image(entry.image)
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
    second: Path | None = None  # a second observer's mask (masks_2nd/), where the data set has one
    binarize: float | None = None  # threshold for grey-level or JPEG masks (None: they are refused)


def list_image_folder(root: str | Path, need_masks: bool = True, ids: list[str] | None = None,
                      binarize: float | None = None, flat_ok: bool = False) -> list[ImageEntry]:
    """Entries of ROOT/images with their masks (and FOV, second-observer masks where present), by name.

    A mask is ROOT/masks/NAME.EXT with any lossless extension (and .jpg, refused when read
    unless `binarize`); two images or two masks with one name are refused by name. With
    flat_ok, a ROOT without images/ that holds image files is itself the image folder (photos
    without masks).
    """
    root_path = Path(root)
    images_dir = root_path / "images"
    if not images_dir.is_dir():
        if not (flat_ok and root_path.is_dir() and image_files(root_path)):
            raise UserError(f"data folder {root_path} has no images/ folder"
                            + (" and holds no images itself" if flat_ok else ""))
        images_dir = root_path
    files = image_files(images_dir)
    if ids is not None:
        wanted = set(ids)
        files = [p for p in files if p.stem in wanted]
        missing = wanted - {p.stem for p in files}
        if missing:
            raise UserError(f"{images_dir}: no image for ids {', '.join(sorted(missing)[:5])}")
    if not files:
        raise UserError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    found = {}
    if images_dir != root_path:
        found = {sub: stem_index(root_path / sub) for sub in ("masks", "fov", "masks_2nd")}
    entries = []
    for path in files:
        named = {sub: find_named(root_path / sub, path.stem, index) for sub, index in found.items()}
        mask = named.get("masks")
        if mask is None and need_masks:
            raise UserError(f"image {path} has no mask {root_path / 'masks' / path.stem}.png "
                            f"(or .{', .'.join(s.lstrip('.') for s in MASK_SUFFIXES[1:])})")
        entries.append(ImageEntry(path.stem, path, mask, named.get("fov"), named.get("masks_2nd"), binarize))
    return entries


def load_image_entry(entry: ImageEntry) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(image, mask or None, FOV or None), every mask checked against the image's size."""
    image = read_image(entry.image)
    masks = []
    for path, binarize, what in ((entry.mask, entry.binarize, "mask"), (entry.fov, None, "fov mask")):
        if path is None:
            masks.append(None)
            continue
        mask = read_mask(path, binarize=binarize, what=what)
        check_same_size(mask, path, image, entry.image, what)
        masks.append(mask)
    return image, masks[0], masks[1]


def load_second_observer(entry: ImageEntry, shape: tuple[int, int]) -> np.ndarray | None:
    """The second observer's mask of an entry (None when it has none), checked against `shape`."""
    if entry.second is None:
        return None
    mask = read_mask(entry.second, binarize=entry.binarize, what="second-observer mask")
    if mask.shape != shape:
        raise UserError(f"second-observer mask {entry.second} is {mask.shape[1]}x{mask.shape[0]} but its image "
                        f"{entry.image} is {shape[1]}x{shape[0]}")
    return mask


def masks_to_tensor(masks: list[np.ndarray], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool masks -> float (B, 1, H, W); with `size`, nearest-resized (the official recipe)."""
    out = []
    for mask in masks:
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        if size is not None and tuple(t.shape[-2:]) != size:
            t = torch.nn.functional.interpolate(t, size=size, mode="nearest")
        out.append(t[0])
    return torch.stack(out)
