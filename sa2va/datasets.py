"""Import a downloaded vessel data set into the suite's layout (images/, masks/, fov/).

    python -m sa2va.datasets SRC --out DST [--format auto|drive|stare|chase_db1|hrf|fives|folders]
                             [--binarize T] [--images DIR --masks DIR --fov DIR
                              --mask-name '{stem}_manual1' --fov-name '{stem}_mask' --derive-fov]

What DST holds (every id is the image's file name without extension; FIVES ids carry their
split, `train_1_A`, because train/ and test/ reuse names):
  images/ID.EXT     the image file, byte for byte (lossless: the original encoding is kept)
  masks/ID.png      the first observer's mask, 0/255 (binary masks are re-encoded, not changed)
  masks_2nd/ID.png  a second observer's mask, where the set has one (DRIVE test, STARE, CHASE_DB1)
  fov/ID.png        the field of view: the set's own mask, or derived from the image (recorded)
  holdout.json      {"ids": [...]} the official test split, where the set has one (DRIVE, FIVES)
  dataset.json      what was found: format, source file of every output, derived FOVs, notes

Every file is found and checked (readable, binary, same size as its image) before any is
written, each refusal names the file and what was wrong, and DST is built in a temporary
sibling and renamed at the end: it is either absent or complete. See docs/data.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from .errors import UserError, run_cli
from .fileio import atomic_dir, write_json, write_mask
from .imageio import IMAGE_SUFFIXES, check_same_size, find_named, image_files, read_image, read_mask

FORMATS = ("drive", "stare", "chase_db1", "hrf", "fives", "folders")
# What --format auto looks for, in this order (the message for an unknown folder lists it).
SIGNS = {
    "drive": "training/images/NN_training.tif or test/images/NN_test.tif (with 1st_manual/, mask/)",
    "stare": "stare-images/ and labels-ah/",
    "chase_db1": "Image_NN[LR].jpg files with Image_NN[LR]_1stHO.png beside them",
    "hrf": "images/, manual1/ and mask/",
    "fives": "train/Original/ or test/Original/ (with 'Ground truth'/)",
}
FOV_METHOD = ("derived: brightest channel > 15% of its 99th percentile (at least 8), opened with a "
              "radius-2 disc, largest component kept, holes filled")


@dataclass
class Item:
    """One image of the source set and its files (absolute paths)."""

    id: str
    image: Path
    mask: Path | None = None
    fov: Path | None = None  # None: derived from the image (when Layout.derive_fov) or absent
    second: Path | None = None
    split: str = ""


@dataclass
class Layout:
    format: str
    root: Path
    items: list[Item]
    test_ids: list[str] | None = None  # the official test split, where the set has one
    derive_fov: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _need(folder: Path, stem: str, what: str, required: bool = True) -> Path | None:
    """The file `folder/stem.EXT`; missing -> refused by name when required."""
    found = find_named(folder, stem)
    if found is None and required:
        raise UserError(f"{what}: {folder / stem}.* not found")
    return found


def _images(folder: Path, pattern: str | None = None) -> list[Path]:
    files = image_files(folder) if folder.is_dir() else []
    return [p for p in files if pattern is None or re.fullmatch(pattern, p.stem)]


def _optional_folder(folder: Path, item_stems: dict[str, str], what: str, notes: list[str], label: str,
                     src: Path) -> dict[str, Path | None]:
    """Masks of one kind for a split: a present folder must hold one for every image (refused by
    name otherwise); an absent folder means none, said in the notes."""
    if not folder.is_dir():
        notes.append(f"{folder.relative_to(src)}/ is absent: {len(item_stems)} {label} imported without {what}")
        return {i: None for i in item_stems}
    return {i: _need(folder, stem, f"{what} of {i}") for i, stem in item_stems.items()}


# --------------------------------------------------------------------------- the layouts


def scan_drive(src: Path) -> Layout:
    """training/ and test/: images/NN_split.tif, 1st_manual/NN_manual1.gif, 2nd_manual/NN_manual2.gif
    (test only), mask/NN_split_mask.gif. A copy without test manuals is imported as it is."""
    items, notes, test_ids = [], [], None
    for split in ("training", "test"):
        base = src / split
        images = _images(base / "images", r"\d+_" + split)
        if not images:
            continue
        ids = {p.stem: p.stem.split("_")[0] for p in images}
        first = _optional_folder(base / "1st_manual", {i: f"{n}_manual1" for i, n in ids.items()},
                                 "manual masks", notes, f"{split} images", src)
        second = ({i: _need(base / "2nd_manual", f"{n}_manual2", f"second manual mask of {i}")
                   for i, n in ids.items()} if (base / "2nd_manual").is_dir() else {i: None for i in ids})
        fov = _optional_folder(base / "mask", {i: f"{i}_mask" for i in ids}, "FOV masks", notes,
                               f"{split} images", src)
        for path in images:
            items.append(Item(path.stem, path, first[path.stem], fov[path.stem], second[path.stem], split))
        if split == "test":
            test_ids = sorted(ids)
    if not items:
        raise UserError(f"{src}: no DRIVE images (training/images/NN_training.tif, test/images/NN_test.tif)")
    derive = any(i.fov is None for i in items)
    return Layout("drive", src, items, test_ids, derive, notes)


def scan_stare(src: Path) -> Layout:
    """stare-images/imNNNN.ppm, labels-ah/imNNNN.ah.ppm (first observer), labels-vk/imNNNN.vk.ppm."""
    images = _images(src / "stare-images")
    if not images:
        raise UserError(f"{src / 'stare-images'} holds no images (imNNNN.ppm; decompress .ppm.gz files first)")
    notes = ["STARE has no FOV masks: derived from the images", "STARE has no official test split: no holdout.json"]
    has_vk = (src / "labels-vk").is_dir()
    if not has_vk:
        notes.append("labels-vk/ is absent: no second observer")
    items = []
    for path in images:
        mask = _need(src / "labels-ah", f"{path.stem}.ah", f"image {path} has no mask")
        second = _need(src / "labels-vk", f"{path.stem}.vk", f"second-observer mask of {path}") if has_vk else None
        items.append(Item(path.stem, path, mask, None, second))
    return Layout("stare", src, items, None, True, notes)


CHASE_IMAGE = r"Image_\d+[LR]"


def scan_chase(src: Path) -> Layout:
    """One folder: Image_NNX.jpg, Image_NNX_1stHO.png (first observer), Image_NNX_2ndHO.png."""
    images = _images(src, CHASE_IMAGE)
    if not images:
        raise UserError(f"{src}: no CHASE_DB1 images (Image_01L.jpg ...)")
    has_second = any(find_named(src, f"{p.stem}_2ndHO") for p in images)
    notes = ["CHASE_DB1 has no FOV masks: derived from the images",
             "CHASE_DB1 has no official test split: no holdout.json"]
    if not has_second:
        notes.append("no *_2ndHO masks: no second observer")
    items = []
    for path in images:
        mask = _need(src, f"{path.stem}_1stHO", f"image {path} has no first-observer mask")
        second = _need(src, f"{path.stem}_2ndHO", f"second-observer mask of {path}") if has_second else None
        items.append(Item(path.stem, path, mask, None, second))
    return Layout("chase_db1", src, items, None, True, notes)


def scan_hrf(src: Path) -> Layout:
    """images/NN_{dr,g,h}.jpg, manual1/NN_x.tif, mask/NN_x_mask.tif."""
    images = _images(src / "images")
    if not images:
        raise UserError(f"{src / 'images'} holds no images (01_dr.JPG ...)")
    items = []
    for path in images:
        mask = _need(src / "manual1", path.stem, f"image {path} has no mask")
        fov = _need(src / "mask", f"{path.stem}_mask", f"image {path} has no FOV mask")
        items.append(Item(path.stem, path, mask, fov))
    return Layout("hrf", src, items, None, False, ["HRF has no official test split: no holdout.json"])


def scan_fives(src: Path) -> Layout:
    """{train,test}/Original/N_X.png with {train,test}/Ground truth/N_X.png; ids split_N_X."""
    items, test_ids = [], None
    for split in ("train", "test"):
        images = _images(src / split / "Original")
        for path in images:
            mask = _need(src / split / "Ground truth", path.stem, f"image {path} has no mask")
            items.append(Item(f"{split}_{path.stem}", path, mask, None, None, split))
        if split == "test" and images:
            test_ids = sorted(f"test_{p.stem}" for p in images)
    if not items:
        raise UserError(f"{src}: no FIVES images (train/Original/1_A.png ...)")
    notes = ["FIVES has no FOV masks: derived from the images"]
    if test_ids is None:
        notes.append("test/ is absent: no holdout.json")
    return Layout("fives", src, items, test_ids, True, notes)


def _name_regex(pattern: str, flag: str) -> re.Pattern[str]:
    if pattern.count("{stem}") != 1:
        raise UserError(f"{flag} must hold {{stem}} once (e.g. '{{stem}}_manual1'), got {pattern!r}")
    return re.compile(re.escape(pattern).replace(re.escape("{stem}"), "(?P<stem>.+)"))


def scan_folders(src: Path, images: Path | None, masks: Path | None, fov: Path | None, mask_name: str,
                 fov_name: str, derive_fov: bool) -> Layout:
    """The user's own data: --images DIR (default SRC), --masks DIR, --fov DIR, masks named by
    --mask-name from the image's stem. Images and masks may share one folder: files whose name
    matches a mask pattern for another image there are masks, not images."""
    images = images or src
    if not images.is_dir():
        raise UserError(f"--images folder {images} does not exist")
    for flag, folder in (("--masks", masks), ("--fov", fov)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{flag} folder {folder} does not exist")
    patterns = [(masks, _name_regex(mask_name, "--mask-name"))] + ([(fov, _name_regex(fov_name, "--fov-name"))]
                                                                  if fov else [])
    for folder, regex in patterns:
        if folder is not None and folder.resolve() == images.resolve() and regex.pattern == "(?P<stem>.+)":
            raise UserError(f"masks in the image folder {images} need a name pattern that tells them apart "
                            "(e.g. --mask-name '{stem}_gt')")
    files = image_files(images)
    stems = {p.stem for p in files}
    shared = [regex for folder, regex in patterns if folder is not None and folder.resolve() == images.resolve()]

    def is_side_file(stem: str) -> bool:
        return any((m := r.fullmatch(stem)) and m.group("stem") in stems for r in shared)

    files = [p for p in files if not is_side_file(p.stem)]
    if not files:
        raise UserError(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = []
    for path in files:
        mask = (_need(masks, mask_name.format(stem=path.stem), f"image {path} has no mask (--mask-name "
                      f"{mask_name!r})") if masks else None)
        fov_file = _need(fov, fov_name.format(stem=path.stem), f"FOV mask of {path}") if fov else None
        items.append(Item(path.stem, path, mask, fov_file))
    notes = [] if masks else ["no --masks: images imported without masks (evaluate.py predicts, no metrics)"]
    return Layout("folders", src, items, None, derive_fov and fov is None, notes)


SCANNERS: dict[str, Callable[[Path], Layout]] = {
    "drive": scan_drive, "stare": scan_stare, "chase_db1": scan_chase, "hrf": scan_hrf, "fives": scan_fives,
}


def _looks_like(src: Path) -> str | None:
    if any(_images(src / s / "images", r"\d+_" + s) for s in ("training", "test")):
        return "drive"
    if (src / "stare-images").is_dir() and (src / "labels-ah").is_dir():
        return "stare"
    if src.is_dir() and any(re.fullmatch(CHASE_IMAGE, p.stem) for p in src.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES):
        return "chase_db1"
    if all((src / d).is_dir() for d in ("images", "manual1", "mask")):
        return "hrf"
    if any((src / s / "Original").is_dir() for s in ("train", "test")):
        return "fives"
    return None


def detect(src: Path) -> tuple[str, Path]:
    """(format, root) of a downloaded set: SRC itself, or its only sub-folder (an unpacked archive)."""
    if not src.is_dir():
        raise UserError(f"source folder {src} does not exist")
    found = _looks_like(src)
    if found:
        return found, src
    subs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subs) == 1 and (found := _looks_like(subs[0])):
        return found, subs[0]
    looked = "; ".join(f"{name}: {sign}" for name, sign in SIGNS.items())
    raise UserError(f"{src}: not a layout --format auto knows (looked for {looked}); for your own data use "
                    "--format folders --images DIR --masks DIR --mask-name '{stem}...'")


# --------------------------------------------------------------------------- the field of view


def derive_fov(image: np.ndarray) -> np.ndarray:
    """The camera's aperture: the image minus its dark border (FOV_METHOD says how)."""
    bright = image.max(axis=-1) if image.ndim == 3 else image
    level = max(8.0, 0.15 * float(np.percentile(bright, 99)))
    fov = bright > level
    yy, xx = np.mgrid[-2:3, -2:3]
    fov = ndimage.binary_opening(fov, structure=(yy ** 2 + xx ** 2) <= 4)
    labels, n = ndimage.label(fov)
    if n > 1:
        sizes = ndimage.sum(fov, labels, index=range(1, n + 1))
        fov = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(fov)


# --------------------------------------------------------------------------- conversion


def _rel(layout: Layout, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.relative_to(layout.root).as_posix()
    except ValueError:
        return str(path)


def check_items(layout: Layout, binarize: float | None) -> None:
    """Unique ids, and no image of DST would overwrite another."""
    seen: dict[str, Item] = {}
    for item in layout.items:
        if item.id in seen:
            raise UserError(f"two images would get the id {item.id!r}: {seen[item.id].image} and {item.image}")
        seen[item.id] = item
    if binarize is not None and not 0 <= binarize < 255:
        raise UserError(f"--binarize must lie in [0, 255), got {binarize}")


def convert(src: str | Path, out: str | Path, fmt: str = "auto", binarize: float | None = None,
            say: Callable[[str], None] = print, **folder_options: Any) -> dict[str, Any]:
    """Import SRC into DST; returns the dataset.json record."""
    src, out = Path(src), Path(out)
    if fmt not in ("auto",) + FORMATS:
        raise UserError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "folders":
        layout = scan_folders(src, **folder_options)
    else:
        if not src.is_dir():
            raise UserError(f"source folder {src} does not exist")
        root = src
        if fmt == "auto":
            fmt, root = detect(src)
            say(f"{src}: found the {fmt} layout" + (f" in {root.name}/" if root != src else ""))
        layout = SCANNERS[fmt](root)
    check_items(layout, binarize)
    out_abs = out.resolve()
    if out_abs == layout.root.resolve() or layout.root.resolve() in out_abs.parents:
        raise UserError(f"--out {out} lies inside the source folder {layout.root}: choose a folder outside it")

    files: dict[str, dict[str, Any]] = {}
    derived = 0
    with atomic_dir(out) as tmp:
        for sub in ("images", "masks", "fov", "masks_2nd"):
            (tmp / sub).mkdir()
        for item in layout.items:
            image = read_image(item.image)
            record: dict[str, Any] = {"split": item.split or None, "image": _rel(layout, item.image)}
            shutil.copyfile(item.image, tmp / "images" / f"{item.id}{item.image.suffix.lower()}")
            for key, sub, path, what in (("mask", "masks", item.mask, "mask"),
                                         ("second", "masks_2nd", item.second, "second-observer mask"),
                                         ("fov", "fov", item.fov, "fov mask")):
                record[key] = _rel(layout, path)
                if path is None:
                    continue
                mask = read_mask(path, binarize=None if key == "fov" else binarize, what=what)
                check_same_size(mask, path, image, item.image, what)
                write_mask(tmp / sub / f"{item.id}.png", mask)
            record["fov_derived"] = item.fov is None and layout.derive_fov
            if record["fov_derived"]:
                fov = derive_fov(image)
                record["fov_fraction"] = round(float(fov.mean()), 4)
                write_mask(tmp / "fov" / f"{item.id}.png", fov)
                derived += 1
            record["size"] = [int(image.shape[1]), int(image.shape[0])]
            files[item.id] = record
        for sub in ("fov", "masks_2nd", "masks"):
            if not any((tmp / sub).iterdir()):
                (tmp / sub).rmdir()
        if layout.test_ids:
            write_json(tmp / "holdout.json", {"ids": layout.test_ids,
                                              "source": f"the official test split of {layout.format}"})
        sizes = sorted({tuple(r["size"]) for r in files.values()})
        doc = {
            "format": layout.format,
            "source": str(layout.root.resolve()),
            "images": len(files),
            "masks": sum(1 for r in files.values() if r["mask"]),
            "second_observer": sum(1 for r in files.values() if r["second"]),
            "fov_given": sum(1 for r in files.values() if r["fov"]),
            "fov_derived": derived,
            "fov_method": FOV_METHOD if derived else None,
            "sizes": [f"{w}x{h}" for w, h in sizes],
            "holdout": len(layout.test_ids) if layout.test_ids else None,
            "binarize": binarize,
            "notes": layout.notes,
            "files": files,
        }
        write_json(tmp / "dataset.json", doc)
    return doc


def summary(doc: dict[str, Any], out: Path) -> str:
    parts = [f"{doc['images']} images ({', '.join(doc['sizes'][:3])}{' ...' if len(doc['sizes']) > 3 else ''})",
             f"{doc['masks']} masks"]
    if doc["second_observer"]:
        parts.append(f"{doc['second_observer']} second-observer masks (masks_2nd/)")
    if doc["fov_given"]:
        parts.append(f"{doc['fov_given']} FOV masks")
    if doc["fov_derived"]:
        parts.append(f"{doc['fov_derived']} FOV masks derived from the images")
    if doc["holdout"]:
        parts.append(f"{doc['holdout']} official test ids in holdout.json")
    lines = [f"wrote {out} ({doc['format']}): " + ", ".join(parts)]
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every entrypoint
        raise UserError(f"{message} (see python -m sa2va.datasets --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sa2va.datasets", description="Import a downloaded vessel data set (DRIVE, STARE, "
                "CHASE_DB1, HRF, FIVES, or your own folders) into images/ masks/ fov/; see docs/data.md.")
    p.add_argument("src", help="the downloaded data set's folder")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="the layout (default: recognise it)")
    p.add_argument("--binarize", type=float, metavar="T",
                   help="threshold grey-level or JPEG masks: vessel = value > T (0-255 scale)")
    f = p.add_argument_group("--format folders")
    f.add_argument("--images", type=Path, help="folder of images (default SRC)")
    f.add_argument("--masks", type=Path, help="folder of masks (may be the image folder; none: no masks)")
    f.add_argument("--fov", type=Path, help="folder of FOV masks")
    f.add_argument("--mask-name", default="{stem}", help="a mask's name from its image's: '{stem}_manual1' ({stem})")
    f.add_argument("--fov-name", default="{stem}", help="a FOV mask's name: '{stem}_mask' (default {stem})")
    f.add_argument("--derive-fov", action="store_true", help="derive FOV masks from the images' dark border")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options: dict[str, Any] = {"images": args.images, "masks": args.masks, "fov": args.fov,
                               "mask_name": args.mask_name, "fov_name": args.fov_name, "derive_fov": args.derive_fov}
    if args.format != "folders" and any(options[k] for k in ("images", "masks", "fov", "derive_fov")):
        raise UserError("--images, --masks, --fov and --derive-fov belong to --format folders")
    if args.format != "folders":
        options = {}
    doc = convert(args.src, args.out, args.format, args.binarize, **options)
    print(summary(doc, Path(args.out)))
    return 0


if __name__ == "__main__":
    run_cli(main)
