"""Small copies of the public vessel data sets, written by the tests themselves.

Synthetic content (sa2va.synth) at a small size, but the real file names, formats and folder
structure of each download, as docs/data.md lists them. Each writer returns the source folder
and the ids the import must produce.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from sa2va.synth import make_sample

SIZE = 64


def sample(i: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_sample(seed=7, index=i, size=size)


def grey(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def save(path: Path, array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path, format=fmt, **kw)
    return path


def gif_mask(path: Path, mask: np.ndarray) -> Path:
    """A palette GIF of 0/255, as DRIVE's manual and FOV masks are."""
    return save(path, grey(mask), "GIF", mode="P")


def write_drive(root: Path, n_train: int = 2, n_test: int = 2, test_manuals: bool = True) -> Path:
    for split, first, count in (("training", 21, n_train), ("test", 1, n_test)):
        for k in range(count):
            nn = f"{first + k:02d}"
            image, mask, fov = sample(first + k)
            save(root / split / "images" / f"{nn}_{split}.tif", image, "TIFF")
            gif_mask(root / split / "mask" / f"{nn}_{split}_mask.gif", fov)
            if split == "training" or test_manuals:
                gif_mask(root / split / "1st_manual" / f"{nn}_manual1.gif", mask)
            if split == "test" and test_manuals:
                gif_mask(root / split / "2nd_manual" / f"{nn}_manual2.gif", np.roll(mask, 1, axis=1))
    return root


def write_stare(root: Path, n: int = 2) -> Path:
    for k in range(1, n + 1):
        image, mask, _ = sample(100 + k)
        save(root / "stare-images" / f"im{k:04d}.ppm", image, "PPM")
        save(root / "labels-ah" / f"im{k:04d}.ah.ppm", np.repeat(grey(mask)[..., None], 3, -1), "PPM")
        save(root / "labels-vk" / f"im{k:04d}.vk.ppm", np.repeat(grey(np.roll(mask, 1, 0))[..., None], 3, -1), "PPM")
    return root


def write_chase(root: Path, n: int = 2) -> Path:
    for k in range(n):
        name = f"Image_{k // 2 + 1:02d}{'LR'[k % 2]}"
        image, mask, _ = sample(200 + k)
        save(root / f"{name}.jpg", image, "JPEG", quality=95)
        save(root / f"{name}_1stHO.png", grey(mask), "PNG")
        save(root / f"{name}_2ndHO.png", grey(np.roll(mask, 1, 1)), "PNG")
    return root


def write_hrf(root: Path) -> Path:
    for k, name in enumerate(("01_dr", "01_g", "01_h")):
        image, mask, fov = sample(300 + k)
        save(root / "images" / f"{name}{'.JPG' if name.endswith('dr') else '.jpg'}", image, "JPEG", quality=95)
        save(root / "manual1" / f"{name}.tif", grey(mask), "TIFF")
        save(root / "mask" / f"{name}_mask.tif", np.repeat(grey(fov)[..., None], 3, -1), "TIFF")
    return root


def write_fives(root: Path) -> Path:
    for split, names in (("train", ("1_A", "2_D")), ("test", ("1_A",))):
        for k, name in enumerate(names):
            image, mask, _ = sample(400 + k + (10 if split == "test" else 0))
            save(root / split / "Original" / f"{name}.png", image, "PNG")
            save(root / split / "Ground truth" / f"{name}.png", np.repeat(grey(mask)[..., None], 3, -1), "PNG")
    return root


LAYOUTS = {
    "drive": (write_drive, ["01_test", "02_test", "21_training", "22_training"], ["01_test", "02_test"]),
    "stare": (write_stare, ["im0001", "im0002"], None),
    "chase_db1": (write_chase, ["Image_01L", "Image_01R"], None),
    "hrf": (write_hrf, ["01_dr", "01_g", "01_h"], None),
    "fives": (write_fives, ["test_1_A", "train_1_A", "train_2_D"], ["test_1_A"]),
}


def jpeg_bytes(array: np.ndarray, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
