"""The one place where images and masks are decoded (evaluation, curation, training, import).

Images come back as uint8 RGB (H, W, 3), whatever the file holds:
  - 8-bit RGB, grey ("L"), 1-bit, palette ("P"), grey+alpha, RGBA, CMYK: converted to RGB
    (alpha is dropped: the colour values are the image);
  - 16-bit grey (PNG, TIFF, PGM; Pillow modes I;16*, I) is scaled to 8 bits by its bit depth,
    read from the values: max <= 255 -> as is (8-bit values in a 16-bit file); max <= 4095 ->
    x * 255 / 4095 (12-bit data, as X-ray and OCT detectors store it); otherwise
    x * 255 / 65535, rounded. An 8-bit image saved as 16 bits (x * 257) thus reads back as the
    same 8-bit image whenever its maximum is at least 16. PGM/PPM files with a smaller maxval
    are scaled to 16 bits by Pillow first. 16-bit RGB (TIFF, PNG, PPM) keeps the top 8 bits.
  - 32-bit float and other modes are refused by name.
EXIF orientation is NOT applied, to images or masks: the pixels are used as stored, so an
image and a mask drawn on it always share one pixel grid. When their sizes disagree and the
image carries an EXIF rotation, the error says so.

Masks come back as bool (H, W). Lossless masks (PNG 1/8/16-bit, palette GIF, PBM/PGM/PPM,
TIFF, BMP) are read when they hold exactly two values {0, v}; grey-level masks and lossy
(JPEG) masks are refused with the values found, unless a threshold is given
(`binarize=T`: vessel where value > T, T on the 0-255 scale, compared with T * 257 on 16-bit
masks). A colour mask is read only when its three channels are equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

# Extensions read as images in images/ folders, and as masks in masks/, fov/, masks_2nd/.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
MASK_SUFFIXES = (".png", ".gif", ".tif", ".tiff", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm", ".jpg", ".jpeg")
LOSSY_FORMATS = ("JPEG", "MPO", "JPEG-compressed TIFF")
EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # SyntaxError: bad PPM header
        raise UserError(f"cannot read {what} {path}: {err}") from err


def orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag (1 = as stored; 2-8 = flipped or rotated), 1 when absent."""
    try:
        with Image.open(path) as img:
            return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1


def sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """16-bit (or wider int) grey values -> uint8, by the bit depth the values show (module doc)."""
    top = int(values.max()) if values.size else 0
    if top <= 255:
        return values.astype(np.uint8)
    scale = 4095 if top <= 4095 else 65535
    return np.round(values.astype(np.float64) * (255.0 / scale)).astype(np.uint8)


def _grey_values(img: Image.Image, path: Path, what: str) -> np.ndarray:
    """The integer values of a single-channel 16/32-bit image (refusing what is not 0..65535)."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f" or img.mode == "F":
        raise UserError(f"{what} {path} is a 32-bit float image (mode F); export it as 8- or 16-bit")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise UserError(f"{what} {path} holds values {arr.min()}..{arr.max()}, outside the 16-bit range")
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3); see the module doc for every mode."""
    path = Path(path)
    img = _open(path, "image")
    with img:
        mode = img.mode
        if mode in _SIXTEEN_BIT_MODES or mode == "F":
            grey = sixteen_to_eight(_grey_values(img, path, "image"))
            return np.repeat(grey[..., None], 3, axis=-1)
        if mode in ("RGB",):
            return np.asarray(img)
        if mode in ("L", "1", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"):
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # Pillow's route for palettes with a transparent index
            return np.asarray(img.convert("RGB"))
        raise UserError(f"image {path} has image mode {mode}, which is not read (expected 8/16-bit grey, "
                        "palette, RGB or RGBA)")


def _shown(values: np.ndarray) -> str:
    """The values of a mask, as an error message lists them."""
    head = ", ".join(str(int(v)) for v in values[:6])
    return head + (f" ... {int(values[-1])} ({values.size} distinct values)" if values.size > 6 else "")


def mask_values(path: str | os.PathLike, what: str = "mask") -> tuple[np.ndarray, str | None, int]:
    """(2-D integer values, the file format, the full-scale value 255 or 65535) of a mask file.

    Colour masks whose channels are equal are read as grey; a palette is looked up; an alpha
    channel that is not fully opaque is refused (a mask drawn in the alpha would read empty).
    """
    path = Path(path)
    img = _open(path, what)
    with img:
        fmt, mode = img.format, img.mode
        if fmt == "TIFF" and str(img.info.get("compression", "")).startswith("jpeg"):
            fmt = "JPEG-compressed TIFF"
        if mode in ("P", "PA"):
            img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
            mode = img.mode
        if mode in _SIXTEEN_BIT_MODES or mode == "F":
            return _grey_values(img, path, what), fmt, 65535
        arr = np.asarray(img)
    if mode in ("LA", "La", "RGBA", "RGBa"):
        if not np.all(arr[..., -1] == 255):
            raise UserError(f"{what} {path} has transparency (an alpha channel that is not fully opaque); masks "
                            "are read from their grey values, so the alpha is not used: save a single-channel "
                            "0/255 mask")
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise UserError(f"{what} {path} has image mode {mode}; expected a single-channel binary mask")
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise UserError(f"{what} {path} is a colour image; expected a single-channel binary mask")
        arr = arr[..., 0]
    if mode == "1":
        arr = arr.astype(np.uint8) * 255
    return arr, fmt, 255


def read_mask(path: str | os.PathLike, binarize: float | None = None, what: str = "mask") -> np.ndarray:
    """Read a binary mask as bool (H, W); refuse lossy and grey-level masks unless `binarize`."""
    path = Path(path)
    arr, fmt, full = mask_values(path, what)
    if binarize is not None:
        if not 0 <= binarize < 255:
            raise UserError(f"--binarize must lie in [0, 255), got {binarize}")
        return arr > (binarize * 257 if full == 65535 else binarize)
    values = np.unique(arr)
    if fmt in LOSSY_FORMATS:
        raise UserError(f"{what} {path} is {fmt} (lossy compression blurs its edges into grey levels): it holds "
                        f"values {_shown(values)}; save it losslessly (PNG), or threshold it with --binarize T "
                        "(vessel = value > T) of python -m sa2va.datasets or evaluate.py")
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        raise UserError(f"{what} {path} is not binary: it holds values {_shown(values)}; expected 0 and one "
                        "other value, or threshold it with --binarize T (vessel = value > T) of python -m "
                        "sa2va.datasets or evaluate.py")
    return arr > 0


def check_same_size(mask: np.ndarray, mask_path: Path, image: np.ndarray, image_path: Path,
                    what: str = "mask") -> None:
    """Refuse a mask whose size differs from its image's, naming both (and an EXIF rotation)."""
    if mask.shape == image.shape[:2]:
        return
    hint = ""
    if mask.shape == image.shape[1::-1] and orientation(image_path) != 1:
        hint = (" (the image carries an EXIF rotation, which is not applied: save the image with its pixels "
                "rotated, or the mask on the stored grid)")
    raise UserError(f"{what} {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                    f"{image.shape[1]}x{image.shape[0]}{hint}")


def stem_index(folder: Path, suffixes: tuple[str, ...] = MASK_SUFFIXES) -> dict[str, list[Path]]:
    """stem -> files of `folder` with one of the extensions (any case), sorted; {} if no folder."""
    index: dict[str, list[Path]] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file():
                index.setdefault(p.stem, []).append(p)
    return index


def find_named(folder: Path, stem: str, index: dict[str, list[Path]] | None = None) -> Path | None:
    """The one file `folder/stem.EXT` with a known mask extension; two of them are refused by name."""
    found = (stem_index(folder) if index is None else index).get(stem, [])
    if len(found) > 1:
        raise UserError(f"{folder} holds {len(found)} files named {stem!r} "
                        f"({', '.join(p.name for p in found)}): keep one")
    return found[0] if found else None


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, sorted; two files with one stem (a.png, a.jpg) are refused by name."""
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            raise UserError(f"two images share the name {stem!r} ({', '.join(str(p) for p in paths)}): each "
                            "image is matched to its mask by name, so keep one")
    return files
