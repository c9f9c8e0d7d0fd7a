"""The synthetic vessel generator: deterministic, realistic enough, and written atomically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize

from sa2va.errors import UserError
from sa2va.fileio import read_mask, read_rgb
from sa2va.synth import make_sample, write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def samples():
    return [make_sample(0, i, 256) for i in range(20)]


def test_same_seed_same_arrays_and_different_seed_differs():
    a = make_sample(5, 3, 128)
    b = make_sample(5, 3, 128)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    c = make_sample(6, 3, 128)
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[0], c[0])


def test_types_shapes_and_fov(samples):
    for image, mask, fov in samples:
        assert image.dtype == np.uint8 and image.shape == (256, 256, 3)
        assert mask.dtype == bool and mask.shape == (256, 256)
        assert fov.dtype == bool and fov.shape == (256, 256)
        assert not (mask & ~fov).any()  # vessels only inside the field of view
        assert image[~fov].mean() < 10  # black outside


def test_vessel_fraction_is_drive_like(samples):
    fractions = [mask.sum() / fov.sum() for _, mask, fov in samples]
    assert 0.08 <= min(fractions) and max(fractions) <= 0.14, fractions
    assert np.std(fractions) > 0.003  # varies between images


def test_thin_and_thick_vessels_present(samples):
    for _, mask, _ in samples:
        half_width = ndimage.distance_transform_edt(mask)[skeletonize(mask)]
        assert (half_width <= 1.0).mean() > 0.3  # 1-2 px capillaries make up much of the length
        assert (half_width >= 2.0).sum() > 20  # trunks at least 3-4 px wide over a real length


def test_vessels_are_dark_thin_ones_faint_and_disc_bright(samples):
    for image, mask, fov in samples:
        green = image[..., 1].astype(float)
        background = fov & ~ndimage.binary_dilation(mask, iterations=3)
        # Local background level (vignetting and the disc vary across the image).
        local = ndimage.uniform_filter(green * background, 21) / np.maximum(ndimage.uniform_filter(background * 1.0, 21), 1e-6)
        depth = local - green
        half_width = ndimage.distance_transform_edt(mask)
        centre = skeletonize(mask)
        thick = centre & (half_width >= 2)
        thin = centre & (half_width <= 1)
        assert depth[thick].mean() > 10
        assert 0 < depth[thin].mean() < depth[thick].mean()  # thin vessels are fainter
        # Fundus colour: red dominates green, green dominates blue.
        r, g, b = (image[..., c][background].mean() for c in range(3))
        assert r > g > b
        assert image[fov].max() > 200  # the optic disc


def test_prefix_stable_dataset(tmp_path):
    small = write_dataset(tmp_path / "a", n=2, size=64, seed=4)
    large = write_dataset(tmp_path / "b", n=3, size=64, seed=4)
    for sub in ("images", "masks", "fov"):
        assert sorted(p.name for p in (small / sub).iterdir()) == ["synth_00000.png", "synth_00001.png"]
        assert len(list((large / sub).iterdir())) == 3
    for name in ("synth_00000.png", "synth_00001.png"):
        assert np.array_equal(read_rgb(small / "images" / name), read_rgb(large / "images" / name))
        assert np.array_equal(read_mask(small / "masks" / name), read_mask(large / "masks" / name))
    image, mask, fov = make_sample(4, 1, 64)
    assert np.array_equal(read_rgb(small / "images" / "synth_00001.png"), image)
    assert np.array_equal(read_mask(small / "masks" / "synth_00001.png"), mask)
    assert np.array_equal(read_mask(small / "fov" / "synth_00001.png"), fov)


def test_write_dataset_refuses_bad_input(tmp_path):
    with pytest.raises(UserError, match="--n"):
        write_dataset(tmp_path / "x", n=0)
    with pytest.raises(UserError, match="--size"):
        write_dataset(tmp_path / "x", n=1, size=32)
    with pytest.raises(UserError, match="--size"):
        write_dataset(tmp_path / "x", n=1, size=100_000)
    with pytest.raises(UserError, match="does not exist"):
        write_dataset(tmp_path / "missing" / "x", n=1, size=64)
    assert not (tmp_path / "x").exists() and not (tmp_path / "missing").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sa2va.synth", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_layout_and_masks_are_binary(tmp_path):
    out = tmp_path / "data"
    res = run_cli("--out", str(out), "--n", "3", "--size", "64", "--seed", "1")
    assert res.returncode == 0, res.stderr
    names = {sub: sorted(p.name for p in (out / sub).iterdir()) for sub in ("images", "masks", "fov")}
    assert names["images"] == names["masks"] == names["fov"] == [f"synth_{i:05d}.png" for i in range(3)]
    from PIL import Image

    for name in names["masks"]:
        with Image.open(out / "masks" / name) as m:
            assert m.mode == "L"
            assert set(np.unique(np.asarray(m)).tolist()) == {0, 255}
        with Image.open(out / "images" / name) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind


def test_cli_refuses_non_empty_out_and_bad_n(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("--out", str(out), "--n", "2", "--size", "64")
    assert res.returncode != 0
    assert res.stderr.strip().startswith("error:") and "not empty" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    res = run_cli("--out", str(tmp_path / "new"), "--n", "0")
    assert res.returncode != 0 and "--n must be at least 1" in res.stderr
    assert not (tmp_path / "new").exists()
