"""Image preprocessing exactly as Sa2VA's predict_forward does it.

ViT: InternVL's dynamic tiling (a grid of square tiles whose aspect ratio is closest to the
image's, plus a thumbnail when there is more than one tile), bicubic, ImageNet mean/std.
SAM2: the image resized straight to image_size x image_size (aspect not kept); the model's
own `grounding_encoder.preprocess_image` normalises it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_grid(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """(columns, rows) of the grid InternVL picks: closest aspect ratio; on a tie, the larger
    grid when the image has more than half the pixels that grid would hold."""
    aspect = width / height
    ratios = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
         if min_num <= i * j <= max_num},
        key=lambda r: r[0] * r[1],
    )
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _to_tensor(img: Image.Image, size: int) -> Tensor:
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (arr - mean) / std


def vit_tiles(image: np.ndarray, tile: int, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True) -> Tensor:
    """uint8 (H, W, 3) -> (tiles, 3, tile, tile) normalised ViT input."""
    img = Image.fromarray(image).convert("RGB")
    cols, rows = tile_grid(img.width, img.height, tile, min_num, max_num)
    resized = img.resize((tile * cols, tile * rows), Image.BICUBIC)
    crops = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(crops) != 1:
        crops.append(img.resize((tile, tile), Image.BICUBIC))
    return torch.stack([_to_tensor(c, tile) for c in crops])


def sam_input(image: np.ndarray, size: int, resample: int = Image.BILINEAR) -> Tensor:
    """uint8 (H, W, 3) -> float (3, size, size) in 0..255, resized straight (aspect not kept),
    with the family's resampling filter (see sa2va.families)."""
    img = Image.fromarray(image).convert("RGB").resize((size, size), resample)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1).contiguous()
