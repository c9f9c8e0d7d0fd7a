"""Writes the committed bad-input corpus of this folder (run it to rebuild the files).

    python tests/bad_inputs/make_bad_inputs.py

Every file is tiny (16 x 16 pixels, a few hundred bytes); the data, pair and model folders
that hold them are put together at test time by tests/test_reliability.py. The output is the
same on every run (no randomness, no timestamps).

  image.png, mask.png        a good 16x16 RGB image and its good 0/255 mask (the base)
  image_truncated.png        the good image's PNG cut in half
  image_not_png.png          text bytes with a .png name
  image_empty.png            0 bytes
  mask_truncated.png         the good mask's PNG cut in half
  mask_wrong_size.png        a good mask, 12 wide instead of 16
  mask_rgba_alpha.png        RGBA: black everywhere, the vessels drawn in the alpha channel only
  mask_rgba_opaque.png       RGBA: grey 0/255 in all three colours, alpha 255 (accepted)
  mask_16bit.png             16-bit grey, 0 / 65535
  mask_jpeg_noisy.png        the good mask after a JPEG round trip, saved as PNG (grey levels)
  mask_colour.png            RGB: red vessels on black
  mask_empty.png             all 0 (no vessel)
  mask_three_values.gif      a palette GIF holding 0, 128 and 255 (a grey level inside a DRIVE-style mask)
  mask_jpeg.jpg              the good mask saved as JPEG (lossy: grey levels at every edge)
  image_truncated.tif        the good image's TIFF cut in half
  image.jpg                  the good image as JPEG (beside image.png: two images with one name)
  pairs_*.json               pair files (dpo_annotations.json) with one problem each
  ids_not_utf8.json          a holdout.json / --holdout-ids file that is not UTF-8
  cfg_*.yaml                 run configs with one problem each
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 16


def _encoded(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    """PNG bytes; the mode follows the array (uint16 2-D = 16-bit grey, 4 channels = RGBA)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def vessel_mask(width: int = SIZE) -> np.ndarray:
    """Two crossing lines: a mask with vessels that erosion, dilation and breaking all change."""
    mask = np.zeros((SIZE, width), bool)
    mask[7:9, :] = True
    mask[:, width // 2 - 1 : width // 2 + 1] = True
    mask[2, 2:6] = True
    return mask


def image() -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([150 + 4 * x, 60 + 2 * y, 40 + x + y], axis=-1).astype(np.uint8)
    rgb[vessel_mask()] //= 2
    return rgb


def files() -> dict[str, bytes]:
    good_image = _png(image())
    mask = vessel_mask()
    grey = np.where(mask, 255, 0).astype(np.uint8)
    good_mask = _png(grey)
    out = {
        "image.png": good_image,
        "mask.png": good_mask,
        "image_truncated.png": good_image[: len(good_image) // 2],
        "image_not_png.png": b"this is a text file with a .png name\n",
        "image_empty.png": b"",
        "mask_truncated.png": good_mask[: len(good_mask) // 2],
        "mask_wrong_size.png": _png(np.where(vessel_mask(12), 255, 0).astype(np.uint8)),
        "mask_16bit.png": _png(np.where(mask, 65535, 0).astype(np.uint16)),
        "mask_empty.png": _png(np.zeros((SIZE, SIZE), np.uint8)),
    }
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 3] = grey
    out["mask_rgba_alpha.png"] = _png(rgba)
    opaque = np.repeat(grey[..., None], 4, axis=-1)
    opaque[..., 3] = 255
    out["mask_rgba_opaque.png"] = _png(opaque)
    colour = np.zeros((SIZE, SIZE, 3), np.uint8)
    colour[mask] = (255, 0, 0)
    out["mask_colour.png"] = _png(colour)
    jpeg = io.BytesIO()
    Image.fromarray(grey).save(jpeg, format="JPEG", quality=75)
    out["mask_jpeg_noisy.png"] = _png(np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("L")))
    three = grey.copy()
    three[0, :4] = 128
    out["mask_three_values.gif"] = _encoded(three, "GIF", mode="P")
    out["mask_jpeg.jpg"] = jpeg.getvalue()
    tiff = _encoded(image(), "TIFF")
    out["image_truncated.tif"] = tiff[: len(tiff) // 2]
    out["image.jpg"] = _encoded(image(), "JPEG", quality=90)

    good = {"image": "images/a.png", "chosen_mask": "masks/a.png", "rejected_mask": "rejected_masks/a.png"}
    pairs = {
        "pairs_missing_key.json": [{"image": "images/a.png", "chosen_mask": "masks/a.png"}],
        "pairs_duplicate_id.json": [{**good, "id": "a"}, {**good, "id": "a"}],
        "pairs_dotdot.json": [{**good, "image": "../outside/a.png"}],
        "pairs_absolute.json": [{**good, "chosen_mask": "/etc/hostname"}],
        "pairs_symlink.json": [{**good, "image": "images/link.png"}],
        "pairs_nul_byte.json": [{**good, "image": "images/a\u0000.png"}],
        "pairs_path_not_string.json": [{**good, "rejected_mask": 7}],
        "pairs_missing_file.json": [{**good, "rejected_mask": "rejected_masks/nothere.png"}],
        "pairs_not_a_list.json": {"pairs": [good]},
        "pairs_empty_list.json": [],
        "pairs_entry_not_object.json": ["images/a.png"],
    }
    for name, obj in pairs.items():
        out[name] = (json.dumps(obj, indent=1) + "\n").encode()
    out["pairs_truncated.json"] = (json.dumps([good], indent=1)[:40]).encode()
    out["pairs_not_utf8.json"] = b'[{"image": "images/\xff\xfe.png"}]\n'
    out["ids_not_utf8.json"] = b'{"ids": ["a\xff"]}\n'

    configs = {
        "cfg_unknown_key.yaml": "optim:\n  learning_rate: 1.0e-5\n",
        "cfg_wrong_type.yaml": "train:\n  micro_batch_size: two\n",
        "cfg_python_tag.yaml": "model:\n  question: !!python/object/apply:os.system ['touch PWNED_BY_YAML']\n",
        "cfg_not_mapping.yaml": "- optim.lr=1e-5\n",
        "cfg_bad_syntax.yaml": "optim: {lr: 1e-5\n",
        "cfg_inf_lr.yaml": "loss:\n  dice: 1.0\noptim:\n  lr: .inf\n",
        "cfg_nan_beta.yaml": "loss:\n  dice: 1.0\n  beta: .nan\n",
    }
    for name, text in configs.items():
        out[name] = text.encode()
    out["cfg_not_utf8.yaml"] = b"model:\n  question: \xff\xfe\n"
    return out


def main() -> None:
    for name, data in files().items():
        (HERE / name).write_bytes(data)
    total = sum(len(d) for d in files().values())
    print(f"wrote {len(files())} files, {total} bytes, to {HERE}")


if __name__ == "__main__":
    main()
