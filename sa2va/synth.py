"""Synthetic fundus-like images with exact vessel masks, for tests and demos.

Each sample is a branching vessel tree grown from an optic disc: trunks thin at every
bifurcation down to 1-px capillaries, paths are curved random walks, thin vessels are
faint, and the image gets vignetting, a dark fovea, texture, blur and noise. The mask is
the binary geometry that was drawn (pixel centres within a segment's radius); only the
image is anti-aliased. Vessels are added thickest first until a per-image target vessel
fraction of the field of view (9.5-12.5%, DRIVE is about 12%) is reached, so the fraction
stays in a realistic band instead of depending on how a random tree happened to grow.

    python -m sa2va.synth --out DIR --n N [--size 256 | --size 565x584] [--seed 0] [--width-px realistic]

writes DIR/images/NAME.png (RGB), DIR/masks/NAME.png (0/255), DIR/fov/NAME.png (0/255),
NAME = synth_00000, synth_00001, ...
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import UserError, run_cli
from .fileio import atomic_dir, read_mask, write_mask, write_png

MIN_SIZE = 64
MAX_SIZE = 2048  # beyond this one float image is >100 MB and generation takes long
R_MIN = 0.5  # capillary radius: pixel centres within 0.5 px of a line give a 1-px, 8-connected trace
FRACTION_RANGE = (0.095, 0.125)  # target vessel pixels / FOV pixels, drawn per image
# Realistic widths (--width-px realistic), in pixels as in a 565x584 DRIVE photo (drawn as a
# 584 px square, cropped to 565 columns): veins 7-9 px, arteries 5-7 px, capillaries 1-2 px.
# All scale with the image side; capillaries never go below 1 px.
WIDTH_MODES = ("scaled", "realistic")
REALISTIC_SIDE = 584
REALISTIC_TRUNK_FACTOR = 3.75 / 1.8  # the vein factor r0 ~ 1.8 becomes a radius of ~3.75 px (7-9 px wide)
REALISTIC_CAPILLARY_R = 0.75  # radius 0.5-0.75: a 1-2 px trace, depending on where the line falls
_VESSEL_CHANNEL_DARKENING = np.array([0.45, 0.65, 0.55])  # vessels lose most in green, as in fundus photos


def sample_name(index: int) -> str:
    return f"synth_{index:05d}"


def _check_args(n: int, size: int) -> None:
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")


def _rasterise(segs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels near a batch of capsules (x0, y0, x1, y1, r): returns ys, xs, distance, radius.

    Every segment gets the same square window around its midpoint, so the whole batch is one
    (n_seg, K, K) array computation with no per-pixel Python.
    """
    x0, y0, x1, y1, r = segs.T
    seg_len = np.hypot(x1 - x0, y1 - y0)
    half = int(math.ceil(seg_len.max() / 2 + r.max() + 1.5))
    off = np.arange(-half, half + 1)
    mx = np.rint((x0 + x1) / 2).astype(np.int64)
    my = np.rint((y0 + y1) / 2).astype(np.int64)
    px = mx[:, None, None] + off[None, None, :]
    py = my[:, None, None] + off[None, :, None]
    dx, dy = x1 - x0, y1 - y0
    den = np.maximum(dx * dx + dy * dy, 1e-12)
    t = ((px - x0[:, None, None]) * dx[:, None, None] + (py - y0[:, None, None]) * dy[:, None, None]) / den[:, None, None]
    t = np.clip(t, 0.0, 1.0)
    d = np.hypot(px - (x0[:, None, None] + t * dx[:, None, None]), py - (y0[:, None, None] + t * dy[:, None, None]))
    rr = np.broadcast_to(r[:, None, None], d.shape)
    px, py = np.broadcast_to(px, d.shape), np.broadcast_to(py, d.shape)
    keep = (d <= rr + 1.0) & (px >= 0) & (px < size) & (py >= 0) & (py < size)
    return py[keep], px[keep], d[keep], rr[keep]


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


class _Tree:
    """Grows vessels one at a time and draws each into the mask and darkness map at once."""

    def __init__(self, rng: np.random.Generator, size: int, centre: float, fov_r: float,
                 fovea: tuple[float, float], faz_r: float, r_min: float = R_MIN, cap_r: float = R_MIN) -> None:
        self.rng = rng
        self.r_min = r_min  # the thinnest vessel
        self.cap_r = cap_r  # vessels up to this radius are capillaries (no branches, end soon)
        self.size = size
        self.scale = size / 256
        self.centre = centre
        self.fov_r = fov_r
        self.fovea = fovea
        self.faz_r = faz_r
        self.step = max(1.0, 1.5 * self.scale)
        self.mask = np.zeros((size, size), bool)
        self.dark = np.zeros((size, size), np.float64)
        self.heap: list[tuple[float, float, tuple]] = []

    def push(self, x: float, y: float, theta: float, r: float, target: float, kind: float) -> None:
        # Thickest first; the random tie-break spreads equal-width capillaries over the tree.
        heapq.heappush(self.heap, (-round(r, 3), float(self.rng.random()), (x, y, theta, r, target, kind)))

    def grow(self, budget: int) -> None:
        while self.heap and int(self.mask.sum()) < budget:
            _, _, state = heapq.heappop(self.heap)
            self._grow_one(*state)

    def _grow_one(self, x: float, y: float, theta: float, r: float, target: float, kind: float) -> None:
        rng, s = self.rng, self.scale
        max_steps = int(3 * self.fov_r / self.step) + 10
        born_capillary = r <= self.cap_r + 1e-9
        kicks = rng.normal(size=max_steps)
        omega = 0.0
        next_branch = rng.exponential((10 + 10 * r / s) * s)  # thick vessels branch less often per length
        cap_len = rng.uniform(8, 35) * max(s, 0.5)  # capillary branches are short
        travelled = 0.0
        since_branch = 0.0
        branch_side = 1.0 if rng.random() < 0.5 else -1.0
        segs = []
        for i in range(max_steps):
            # Tortuosity: a damped random walk of the turning rate; thin vessels wander more.
            omega = 0.8 * omega + kicks[i] * (0.012 + 0.03 / (1 + r / s))
            theta += omega + 0.03 * _wrap(target - theta)
            nx, ny = x + self.step * math.cos(theta), y + self.step * math.sin(theta)
            if math.hypot(nx - self.centre, ny - self.centre) > self.fov_r - r - 0.5:
                break
            if math.hypot(nx - self.fovea[0], ny - self.fovea[1]) < self.faz_r:
                break  # the foveal avascular zone has no vessels
            segs.append((x, y, nx, ny, r))
            x, y = nx, ny
            travelled += self.step
            since_branch += self.step
            if r <= self.cap_r + 1e-9:
                # Capillary branches end soon; a trunk that has thinned out runs on to the rim.
                if born_capillary and travelled >= cap_len:
                    break
                continue
            if since_branch >= next_branch:
                # Bifurcation: the side branch takes a smaller share, the main vessel narrows too.
                side_r = max(self.r_min, r * rng.uniform(0.4, 0.7))
                angle = theta + branch_side * math.radians(rng.uniform(35, 80))
                self.push(x, y, angle, side_r, angle, kind)
                r = max(self.r_min, r * rng.uniform(0.85, 0.95))
                branch_side = -branch_side if rng.random() < 0.75 else branch_side
                since_branch = 0.0
                next_branch = rng.exponential((10 + 10 * r / s) * s)
        if segs:
            self._draw(np.asarray(segs, np.float64), kind)

    def _draw(self, segs: np.ndarray, kind: float) -> None:
        ys, xs, d, r = _rasterise(segs, self.size)
        inside = d <= r
        self.mask[ys[inside], xs[inside]] = True
        coverage = np.clip(r + 0.5 - d, 0.0, 1.0)
        contrast = kind * 0.8 * (1.0 - np.exp(-r / (0.9 * self.scale)))  # thin vessels are faint
        np.maximum.at(self.dark, (ys, xs), coverage * contrast)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="reflect")
    return field / max(float(field.std()), 1e-12)


def make_sample(seed: int, index: int, size: int = 256, widths: str = "scaled",
                width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic sample: (image uint8 HxWx3, vessel mask bool HxW, field of view bool HxW).

    Seeded from (seed, index) alone, so sample k is the same whatever n a data set has.
    widths: "scaled" (vessel widths grow with the image, capillaries 1 px) or "realistic"
    (widths in pixels as in fundus photos: see WIDTH_MODES). width: crop the square
    size x size sample to this many columns, centred (565 of 584 gives DRIVE's 565x584).
    """
    _check_args(1, size)
    if widths not in WIDTH_MODES:
        raise UserError(f"--width-px must be one of {', '.join(WIDTH_MODES)}, got {widths!r}")
    if width is not None and not MIN_SIZE <= width <= size:
        raise UserError(f"the image width must be between {MIN_SIZE} and the height {size} px, got {width}")
    rng = np.random.default_rng([int(seed), int(index)])
    s = size / 256
    # Radius of a vessel drawn with radius factor r0: r0 * s (scaled) or r0 * radius_scale (realistic).
    radius_scale = s
    r_min = cap_r = R_MIN
    if widths == "realistic":
        px = size / REALISTIC_SIDE
        radius_scale = REALISTIC_TRUNK_FACTOR * px
        r_min, cap_r = R_MIN * max(1.0, px), REALISTIC_CAPILLARY_R * max(1.0, px)
    centre = (size - 1) / 2
    fov_r = 0.46 * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dist_c = np.hypot(xx - centre, yy - centre)
    fov = dist_c <= fov_r

    # Disc near one side, fovea a little past the centre on the other (a macula-centred photo).
    side = 1.0 if rng.random() < 0.5 else -1.0
    disc = (centre + side * rng.uniform(0.55, 0.65) * fov_r, centre + rng.uniform(-0.08, 0.08) * fov_r)
    disc_r = rng.uniform(0.13, 0.16) * fov_r
    fovea = (centre - side * rng.uniform(0.05, 0.15) * fov_r, centre + rng.uniform(-0.05, 0.05) * fov_r)
    fovea_r = rng.uniform(0.10, 0.14) * fov_r

    tree = _Tree(rng, size, centre, fov_r, fovea, faz_r=0.07 * fov_r, r_min=r_min, cap_r=cap_r)
    temporal = math.pi if side > 0 else 0.0  # direction from the disc towards the fovea
    tsign = math.cos(temporal)
    for up in (-1.0, 1.0):
        # Temporal arcades leave the disc steeply and are pulled round towards the fovea side.
        a = math.radians(rng.uniform(55, 75))
        arcade = math.atan2(up * math.sin(a), tsign * math.cos(a))
        # Nasal trunks run roughly radially away from the fovea (pulled to their own start).
        b = math.radians(rng.uniform(20, 50))
        nasal = math.atan2(up * math.sin(b), -tsign * math.cos(b))
        for direction, is_arcade in ((arcade, True), (nasal, False)):
            for kind, r0 in ((1.0, rng.uniform(1.6, 2.0)), (0.75, rng.uniform(1.2, 1.5))):  # vein, artery
                theta = direction + math.radians(rng.uniform(-12, 12))
                tx, ty = disc[0] + 0.2 * disc_r * math.cos(theta), disc[1] + 0.2 * disc_r * math.sin(theta)
                # Trunks are never born as capillaries, even on tiny images.
                tree.push(tx, ty, theta, max(1.0, r0 * radius_scale), temporal if is_arcade else theta, kind)
    for _ in range(2):  # small macular branches heading straight for the fovea
        theta = temporal + math.radians(rng.uniform(-25, 25))
        tree.push(disc[0], disc[1], theta, max(r_min, rng.uniform(0.9, 1.4) * radius_scale), theta, 0.8)

    fov_pixels = int(fov.sum())
    tree.grow(budget=int(rng.uniform(*FRACTION_RANGE) * fov_pixels))
    mask = tree.mask & fov

    # Background: orange-red fundus, vignetting, two scales of texture.
    base = np.array([rng.uniform(185, 225), rng.uniform(75, 105), rng.uniform(30, 55)])
    rel = dist_c / fov_r
    shade = (1.0 - 0.45 * np.clip(rel, 0, 1) ** 2.5)
    shade *= 1.0 + 0.06 * _smooth_noise(rng, size, size / 16)
    shade *= 1.0 + 0.025 * _smooth_noise(rng, size, 1.5 * s)
    img = base[None, None, :] * shade[..., None]

    # Bright optic disc with a soft edge and a paler cup.
    d_disc = np.hypot(xx - disc[0], yy - disc[1])
    disc_profile = np.exp(-((d_disc / disc_r) ** 4))
    disc_col = np.array([255.0, 225.0, 160.0]) * rng.uniform(0.88, 1.0)
    img += 0.85 * disc_profile[..., None] * (disc_col - img)
    cup = np.exp(-((d_disc / (0.45 * disc_r)) ** 2))
    img += 0.3 * cup[..., None] * (np.array([255.0, 245.0, 215.0]) - img)

    # Dark fovea.
    d_fov = np.hypot(xx - fovea[0], yy - fovea[1])
    img *= (1.0 - rng.uniform(0.25, 0.4) * np.exp(-((d_fov / fovea_r) ** 2)))[..., None]

    # Vessels darken the image, most strongly in green.
    img *= 1.0 - tree.dark[..., None] * _VESSEL_CHANNEL_DARKENING[None, None, :]

    img = ndimage.gaussian_filter(img, sigma=(0.6 * s, 0.6 * s, 0))
    img += rng.normal(0.0, rng.uniform(2.0, 5.0), size=img.shape)
    edge = np.clip(fov_r - dist_c + 0.5, 0.0, 1.0)  # anti-aliased FOV rim, black outside
    img *= edge[..., None]
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if width is not None and width < size:
        left = (size - width) // 2
        image, mask, fov = (np.ascontiguousarray(a[:, left:left + width]) for a in (image, mask, fov))
    return image, mask, fov


def write_dataset(out: str | os.PathLike, n: int, size: int = 256, seed: int = 0, widths: str = "scaled",
                  width: int | None = None) -> Path:
    """Write n samples to out/{images,masks,fov}/synth_NNNNN.png atomically; return out.
    `widths` and `width` as in make_sample."""
    _check_args(n, size)
    if widths not in WIDTH_MODES:
        raise UserError(f"--width-px must be one of {', '.join(WIDTH_MODES)}, got {widths!r}")
    if width is not None and not MIN_SIZE <= width <= size:
        raise UserError(f"the image width must be between {MIN_SIZE} and the height {size} px, got {width}")
    out = Path(out)
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise UserError(f"parent folder {out.parent} {what}")
    progress = None
    try:
        from rich.progress import Progress

        progress = Progress(transient=True, disable=not sys.stderr.isatty())
    except ImportError:  # rich is a nicety, never a requirement
        pass
    try:
        with atomic_dir(out) as tmp:
            for sub in ("images", "masks", "fov"):
                (tmp / sub).mkdir()
            if progress is not None:
                progress.start()
                task = progress.add_task("synthesising", total=n)
            for i in range(n):
                image, mask, fov = make_sample(seed, i, size, widths, width)
                name = sample_name(i) + ".png"
                write_png(tmp / "images" / name, image)
                write_mask(tmp / "masks" / name, mask)
                write_mask(tmp / "fov" / name, fov)
                if progress is not None:
                    progress.advance(task)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from err
    finally:
        if progress is not None:
            progress.stop()
    return out


def write_dilated_pairs(out: str | os.PathLike, n: int, size: int = 128, seed: int = 0) -> Path:
    """A small pair folder for tests and benchmarks: `write_dataset`, plus rejected = the ground
    truth dilated twice (a plausible over-segmentation) and dpo_annotations.json."""
    import json

    root = write_dataset(out, n, size=size, seed=seed)
    pairs = []
    for image in sorted((root / "images").glob("*.png")):
        mask = read_mask(root / "masks" / image.name)
        write_mask(root / "rejected_masks" / image.name, ndimage.binary_dilation(mask, iterations=2))
        pairs.append({"image": f"images/{image.name}", "chosen_mask": f"masks/{image.name}",
                      "rejected_mask": f"rejected_masks/{image.name}"})
    (root / "dpo_annotations.json").write_text(json.dumps(pairs))
    return root


def parse_size(text: str) -> tuple[int, int | None]:
    """--size: "N" (square) or "WxH" (drawn as an H square, cropped to W columns) -> (H, W or None)."""
    try:
        if "x" in text.lower():
            w, h = (int(v) for v in text.lower().split("x"))
            if w > h:
                raise UserError(f"--size {text}: the width must not exceed the height (the sample is cropped "
                                "from a square of the height)")
            return h, (w if w < h else None)
        return int(text), None
    except ValueError:
        raise UserError(f"--size must be N or WxH in pixels, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sa2va.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--size", default="256",
                        help=f"image side in pixels ({MIN_SIZE}-{MAX_SIZE}), or WxH with W <= H (565x584 = DRIVE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width-px", choices=WIDTH_MODES, default="scaled",
                        help="vessel widths: scaled with the image (default) or realistic (pixels as in fundus "
                             "photos: capillaries 1-2 px, trunks 7-9 px at 565 px)")
    args = parser.parse_args(argv)
    size, width = parse_size(args.size)
    out = write_dataset(args.out, args.n, size, args.seed, args.width_px, width)
    print(f"wrote {args.n} samples to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
