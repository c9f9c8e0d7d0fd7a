"""The resolution ceiling of a data set: what a perfect model at the logit resolution can reach.

    python evaluate.py --ceiling --data DIR [--model M] [--tile-size PX|auto] [--tile-overlap PX]

A Sa2VA mask is predicted on a low_res x low_res logit grid (a quarter of SAM2's input side) and
upsampled to the image. The perfect model of that grid predicts, in each cell, the fraction of
the cell that is vessel (the true mask area-averaged onto the grid); upsampled as the forward
upsamples logits and thresholded at 0.5, that is the best mask the grid allows. Its Dice and
clDice against the truth are the ceiling: no training can go past it. It is reported untiled and
with tiles (--tile-size, default auto = tiles of the grid side, one logit per pixel).

No model runs. The grid comes from --model's config.json (sam2_config.image_size) when given,
else from the real Sa2VA release (SAM2 at 1024 px -> 256x256 logits). Results: OUT/results.json
with a `ceiling` section (docs/resolution.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import TilingConfig
from .data import load_image_entry
from .errors import UserError
from .fileio import check_writable_dir, write_json
from .metrics import METRICS, image_metrics, summarize
from .tiling import RELEASE_SAM_SIZE, ceiling_mask, resolve, sam_size_of

CEILING_METRICS = ("dice", "cldice")


def logit_grid(model: str | None) -> tuple[int, int, str]:
    """(SAM2 input side, logit grid side, where it came from)."""
    if not model:
        return RELEASE_SAM_SIZE, RELEASE_SAM_SIZE // 4, (f"no --model: the real Sa2VA release (SAM2 input "
                                                         f"{RELEASE_SAM_SIZE} px, logits {RELEASE_SAM_SIZE // 4}x"
                                                         f"{RELEASE_SAM_SIZE // 4})")
    from .evaluation import _model_code_folder

    path = Path(model)
    if not path.exists():
        raise UserError(f"model folder {path} does not exist")
    sam_size, source = sam_size_of(_model_code_folder(path))
    return sam_size, sam_size // 4, source


def run_ceiling(args: argparse.Namespace) -> int:
    from .evaluation import _console, select_images, summary_table, tile_options

    for flag in ("save_masks", "json", "metrics"):
        if getattr(args, flag, None):
            raise UserError(f"--ceiling runs no model; --{flag.replace('_', '-')} does not apply")
    if not args.data:
        raise UserError("--ceiling needs --data DIR (a folder with images/ and masks/)")
    data = Path(args.data)
    sam_size, low_res, source = logit_grid(args.model)
    size, overlap = tile_options(args, TilingConfig(size="auto"))
    if size is None:
        raise UserError("--ceiling compares untiled with tiled: give --tile-size PX or auto, not off")
    tiles = resolve(size, overlap, low_res, "--tile-size", "--tile-overlap", prefix="")
    entries, selection, sentence, unscored = select_images(data, args.all_images)
    if unscored is not None or any(e.mask is None for e in entries):
        raise UserError(f"--ceiling needs a mask for every image of {data} (masks/NAME.png)")
    out = Path(args.out) if args.out else Path("eval") / f"ceiling_{data.resolve().name}"
    check_writable_dir(out)
    console = _console()
    console.print(sentence)
    console.print(f"logit grid {low_res}x{low_res} (SAM2 input {sam_size} px), from {source}; "
                  f"tiles of {tiles.size} px, overlap {tiles.overlap} px")

    rows: dict[str, dict[str, dict[str, float]]] = {"untiled": {}, "tiled": {}}
    for entry in entries:
        _, gt, fov = load_image_entry(entry)
        for name, tiling in (("untiled", None), ("tiled", tiles)):
            rows[name][entry.name] = image_metrics(ceiling_mask(gt, low_res, sam_size, tiling), gt, fov)
    n_boot = 2000 if args.n_boot is None else args.n_boot
    if n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, got {n_boot}")
    section: dict[str, Any] = {"sam_size": sam_size, "logit_grid": low_res, "grid_from": source,
                               "tiling": {"size": tiles.size, "overlap": tiles.overlap}}
    for name, per in rows.items():
        summary = summarize(list(per.values()), METRICS, n_boot=n_boot, seed=args.seed)
        section[name] = {"metrics": summary,
                         "per_image": {n: {m: r[m] for m in CEILING_METRICS} for n, r in per.items()}}
        title = f"ceiling {name}" + (f" (tiles {tiles.size} px, overlap {tiles.overlap})" if name == "tiled" else "")
        console.print(summary_table(f"{title}: {len(per)} images, logit grid {low_res}x{low_res}", summary))
    results = {"data": str(data.resolve()), "selection": selection, "n": len(entries),
               "model": str(Path(args.model).resolve()) if args.model else None, "ceiling": section}
    write_json(out / "results.json", results)
    d_u, d_t = (section[k]["metrics"]["dice"]["mean"] for k in ("untiled", "tiled"))
    console.print(f"ceiling Dice: untiled {d_u:.4f}, tiled {d_t:.4f}; wrote {out / 'results.json'}")
    return 0
