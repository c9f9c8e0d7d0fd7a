"""Overlays with a legend, and the outputs of a prediction run without masks (evaluate.py --predict).

An overlay is the image darkened (to 45%, to 15% outside the FOV) with the mask drawn on it in
colours, and a legend strip below the image that says what each colour means. With ground
truth: white = vessel found (true positive), red = predicted where there is no vessel (false
positive), blue = vessel missed (false negative). Without: yellow = predicted vessel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOUR_TP = (255, 255, 255)  # white: vessel found
COLOUR_FP = (255, 40, 40)  # red: predicted, not a vessel
COLOUR_FN = (40, 110, 255)  # blue: vessel missed
COLOUR_PRED = (255, 220, 0)  # yellow: predicted vessel, no ground truth to judge it
DIM_INSIDE = 0.45  # brightness kept inside the field of view
DIM_OUTSIDE = 0.15  # outside it (not scored)
LEGEND_SCORED = ((COLOUR_TP, "vessel found (true positive)"), (COLOUR_FP, "predicted, no vessel (false positive)"),
                 (COLOUR_FN, "vessel missed (false negative)"))
LEGEND_PREDICTED = ((COLOUR_PRED, "predicted vessel (no ground truth: not scored)"),)


def _darkened(image: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    out = image.astype(np.float32) * DIM_INSIDE
    if fov is not None:
        out[~fov] = image[~fov].astype(np.float32) * DIM_OUTSIDE
    return out.astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def with_legend(image: np.ndarray, legend: Sequence[tuple[tuple[int, int, int], str]]) -> np.ndarray:
    """The image with a strip below it: one coloured square and its meaning per line. The strip
    is as wide as its text needs; the image keeps its size (black on the right if narrower)."""
    height, width = image.shape[:2]
    size = max(10, min(32, width // 40))
    font = _font(size)
    pad = max(3, size // 3)
    line = size + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(text, font=font)) for _, text in legend)
    canvas_w = max(width, pad * 3 + size + text_w)
    canvas = Image.new("RGB", (canvas_w, height + pad + line * len(legend)), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, text) in enumerate(legend):
        top = height + pad + i * line
        draw.rectangle((pad, top, pad + size - 1, top + size - 1), fill=colour)
        draw.text((pad * 2 + size, top), text, fill=(230, 230, 230), font=font)
    return np.asarray(canvas)


def overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, fov: np.ndarray | None = None,
            legend: bool = True) -> np.ndarray:
    """The darkened image with TP/FP/FN drawn (or, with no ground truth, the prediction alone)."""
    out = _darkened(image, fov)
    if fov is not None:
        pred = pred & fov
    if gt is None:
        out[pred] = COLOUR_PRED
        return with_legend(out, LEGEND_PREDICTED) if legend else out
    if fov is not None:
        gt = gt & fov
    out[pred & gt] = COLOUR_TP
    out[pred & ~gt] = COLOUR_FP
    out[~pred & gt] = COLOUR_FN
    return with_legend(out, LEGEND_SCORED) if legend else out


def probability_png(prob: np.ndarray) -> np.ndarray:
    """A probability map as 8-bit grey: round(255 * p) (p = 0.5 is 128)."""
    return np.round(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


def prediction_record(opts: Any, names: list[str], masks: dict[str, np.ndarray], reason: str,
                      seconds: dict[str, float], world: int, device: str, dtype: str) -> dict[str, Any]:
    """predictions.json: what ran on which images, and why no metrics were computed."""
    head = {n: masks[n] for n in names}
    return {
        "model": str(Path(opts.model).resolve()),
        "data": str(Path(opts.data).resolve()),
        "mode": "predict",
        "metrics": None,
        "why_no_metrics": reason,
        "path": opts.mode,
        "headline": opts.headline,
        "n": len(names),
        "threshold": opts.threshold,
        "question": opts.question,
        "answer": opts.answer,
        "world_size": world,
        "device": device,
        "dtype": dtype,
        "speed": {p: (len(names) / s if s > 0 else None) for p, s in seconds.items()},
        "per_image": {n: {"width": int(m.shape[1]), "height": int(m.shape[0]),
                          "vessel_fraction": float(m.mean())} for n, m in head.items()},
    }
