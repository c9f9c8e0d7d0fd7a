"""Real vessel data in, predictions out: the five public layouts imported and evaluated, every
image and mask format, prediction without masks, hub ids, whole tables (issue 14).

The tiny checkpoint is loaded for real once per module and reused by every in-process
evaluate.py run here (`evaluation.load_model` is wrapped in a cache, not replaced).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from layouts import LAYOUTS, grey, jpeg_bytes, sample, save, write_chase, write_drive
from PIL import Image

from sa2va import datasets, evaluation
from sa2va.errors import UserError
from sa2va.imageio import read_image, read_mask


@pytest.fixture(scope="module")
def shared_model(tiny_model):
    """evaluation.load_model, loading each model folder once for the whole module."""
    real = evaluation.load_model
    cache: dict[str, object] = {}

    def load_once(model, trust_remote_code, device, dtype="auto"):
        key = f"{Path(model).resolve()}|{dtype}"
        if key not in cache:
            cache[key] = real(model, trust_remote_code, device, dtype)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(evaluation, "load_model", load_once)
    yield tiny_model
    mp.undo()


def evaluate(model: Path, data: Path, out: Path, *extra: str) -> int:
    return evaluation.main(["--model", str(model), "--data", str(data), "--out", str(out), "--trust-remote-code",
                            "--device", "cpu", "--n-boot", "50", *extra])


# --------------------------------------------------------------------------- the five layouts


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_import_each_layout_then_evaluate(name, shared_model, tmp_path, capsys):
    writer, ids, test_ids = LAYOUTS[name]
    src = writer(tmp_path / "download" / name.upper())  # as unpacked: one folder named after the set
    out = tmp_path / "imported"
    assert datasets.main([str(tmp_path / "download"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"found the {name} layout" in said

    doc = json.loads((out / "dataset.json").read_text())
    assert doc["format"] == name and sorted(doc["files"]) == ids
    assert sorted(p.stem for p in (out / "images").iterdir()) == ids
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{i}.png" for i in ids]
    assert sorted(p.name for p in (out / "fov").iterdir()) == [f"{i}.png" for i in ids]
    for i, record in doc["files"].items():  # images are copied byte for byte; masks keep every pixel
        image = next((out / "images").glob(f"{i}.*"))
        assert image.read_bytes() == (src / record["image"]).read_bytes()
        assert np.array_equal(read_mask(out / "masks" / f"{i}.png"), read_mask(src / record["mask"]))
    derived = name in ("stare", "chase_db1", "fives")
    assert doc["fov_derived"] == (len(ids) if derived else 0)
    assert all(r["fov_derived"] == derived for r in doc["files"].values())
    assert (doc["fov_method"] is not None) == derived
    second = {"drive": 2, "stare": 2, "chase_db1": 2}.get(name, 0)
    assert doc["second_observer"] == second and (out / "masks_2nd").is_dir() == bool(second)
    holdout = out / "holdout.json"
    if test_ids:
        assert json.loads(holdout.read_text())["ids"] == test_ids
    else:
        assert not holdout.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left

    result = tmp_path / "eval"
    assert evaluate(shared_model, out, result) == 0
    results = json.loads((result / "results.json").read_text())
    assert sorted(results["per_image"]) == (test_ids or ids)
    if name in ("drive", "stare", "chase_db1"):  # DRIVE's second observer marks only the test images
        assert results["second_observer"]["n"] == second
        assert 0.0 < results["second_observer"]["metrics"]["dice"]["mean"] < 1.0


def test_derived_fov_follows_the_aperture():
    for i in range(3):
        image, _, fov = sample(i, size=128)
        got = datasets.derive_fov(image)
        assert 2 * (got & fov).sum() / (got.sum() + fov.sum()) > 0.98


def test_drive_without_test_manuals_is_imported_as_it_is(tmp_path, capsys):
    src = write_drive(tmp_path / "DRIVE", test_manuals=False)
    assert datasets.main([str(src), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert "test/1st_manual/ is absent: 2 test images imported without manual masks" in said
    doc = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert doc["images"] == 4 and doc["masks"] == 2 and doc["second_observer"] == 0


def test_folders_format_with_masks_beside_the_images(tmp_path, shared_model):
    src = tmp_path / "angio"
    for k in range(2):
        image, mask, _ = sample(500 + k)
        gray16 = (image[..., 1].astype(np.uint16) * 257)
        save(src / f"{k + 1}.pgm", gray16, "PPM")  # 16-bit PGM
        save(src / f"{k + 1}_gt.pgm", grey(mask), "PPM")
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--format", "folders", "--masks", str(src), "--mask-name", "{stem}_gt"]
    assert datasets.main(args) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1.pgm", "2.pgm"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["1.png", "2.png"]
    assert not (out / "fov").exists()
    assert evaluate(shared_model, out, tmp_path / "eval") == 0
    with pytest.raises(UserError, match="tells them apart"):
        datasets.main([str(src), "--out", str(tmp_path / "o2"), "--format", "folders", "--masks", str(src)])


def test_unknown_folder_lists_what_was_looked_for(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(UserError) as err:
        datasets.main([str(tmp_path / "stuff"), "--out", str(tmp_path / "out")])
    for what in ("drive", "stare-images", "Image_NN", "manual1", "Original", "--format folders"):
        assert what in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refused_import_leaves_no_output(tmp_path):
    src = write_chase(tmp_path / "CHASE")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "Image_01R_1stHO.png")  # a wrong-size mask
    with pytest.raises(UserError, match="Image_01R_1stHO.png is 10x10"):
        datasets.main([str(src), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CHASE"]


# --------------------------------------------------------------------------- masks


def _mask() -> np.ndarray:
    return sample(600)[1]


LOSSLESS = {
    "png_8bit.png": lambda m: save_bytes(grey(m), "PNG"),
    "png_1bit.png": lambda m: save_bytes(grey(m), "PNG", mode="1"),
    "png_16bit.png": lambda m: save_bytes(np.where(m, 65535, 0).astype(np.uint16), "PNG"),
    "png_16bit_value1.png": lambda m: save_bytes(m.astype(np.uint16), "PNG"),
    "palette.gif": lambda m: save_bytes(grey(m), "GIF", mode="P"),
    "grey.pgm": lambda m: save_bytes(grey(m), "PPM"),
    "colour.ppm": lambda m: save_bytes(np.repeat(grey(m)[..., None], 3, -1), "PPM"),
    "bits.pbm": lambda m: save_bytes(grey(m), "PPM", mode="1"),
    "mask.tif": lambda m: save_bytes(grey(m), "TIFF"),
    "mask_16bit.tif": lambda m: save_bytes(np.where(m, 65535, 0).astype(np.uint16), "TIFF"),
    "mask.bmp": lambda m: save_bytes(grey(m), "BMP"),
    "palette.png": lambda m: save_bytes(grey(m), "PNG", mode="P"),
    "opaque_la.png": lambda m: save_bytes(grey(m), "PNG", mode="LA"),
}


def save_bytes(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_every_lossless_mask_format_reads_the_same_mask(name, tmp_path):
    mask = _mask()
    path = tmp_path / name
    path.write_bytes(LOSSLESS[name](mask))
    assert np.array_equal(read_mask(path), mask)


def test_lossy_and_grey_level_masks_are_refused_with_their_values(tmp_path):
    mask = _mask()
    jpeg = tmp_path / "mask.jpg"
    jpeg.write_bytes(jpeg_bytes(grey(mask), quality=90))
    with pytest.raises(UserError) as err:
        read_mask(jpeg)
    assert "mask.jpg is JPEG" in str(err.value) and "values 0, 1" in str(err.value) and "--binarize" in str(err.value)
    got = read_mask(jpeg, binarize=127)
    assert (got != mask).mean() < 0.01  # the threshold recovers the mask, up to a few edge pixels
    three = tmp_path / "three.gif"
    levels = grey(mask)
    levels[:4] = 128
    three.write_bytes(save_bytes(levels, "GIF", mode="P"))
    with pytest.raises(UserError, match=r"three.gif is not binary: it holds values 0, 128, 255"):
        read_mask(three)
    sixteen = tmp_path / "m16.png"
    sixteen.write_bytes(save_bytes(np.where(mask, 40000, 0).astype(np.uint16), "PNG"))
    assert np.array_equal(read_mask(sixteen, binarize=150), mask)  # 150 * 257 = 38550 < 40000
    assert not read_mask(sixteen, binarize=160).any()


# --------------------------------------------------------------------------- images


def test_image_modes_read_as_rgb(tmp_path):
    image = sample(700)[0]
    g8 = image[..., 1]
    cases = {
        "rgb.ppm": (save_bytes(image, "PPM"), image),
        "grey.png": (save_bytes(g8, "PNG"), np.repeat(g8[..., None], 3, -1)),
        "grey16.png": (save_bytes(g8.astype(np.uint16) * 257, "PNG"), np.repeat(g8[..., None], 3, -1)),
        "grey16.tif": (save_bytes(g8.astype(np.uint16) * 257, "TIFF"), np.repeat(g8[..., None], 3, -1)),
        "grey16.pgm": (save_bytes(g8.astype(np.uint16) * 257, "PPM"), np.repeat(g8[..., None], 3, -1)),
        "rgba.png": (save_bytes(np.dstack([image, np.full(g8.shape, 7, np.uint8)]), "PNG"), image),
        "palette.png": (save_bytes(image, "PNG", mode="P"), None),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == image.shape, name
        if expected is not None:
            assert np.array_equal(got, expected), name
    twelve = tmp_path / "twelve.png"  # 12-bit data in a 16-bit file is scaled by 4095, not left dark
    twelve.write_bytes(save_bytes((g8.astype(np.int64) * 4095 // 255).astype(np.uint16), "PNG"))
    assert np.abs(read_image(twelve)[..., 0].astype(int) - g8).max() <= 1
    floats = tmp_path / "float.tif"
    floats.write_bytes(save_bytes(g8.astype(np.float32), "TIFF"))
    with pytest.raises(UserError, match="float.tif is a 32-bit float image"):
        read_image(floats)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(save_bytes(image, "TIFF")[:300])
    with pytest.raises(UserError, match="cannot read image .*cut.tif"):
        read_image(cut)


def test_exif_orientation_is_not_applied_and_a_rotated_pair_is_named(tmp_path):
    image = sample(701)[0][:, :48]  # 64 high, 48 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    path = tmp_path / "photo.jpg"
    Image.fromarray(image).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    assert read_image(path).shape == (64, 48, 3)  # the stored grid
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    path.rename(data / "images" / "photo.jpg")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(data / "masks" / "photo.png")  # drawn on the rotated view
    from sa2va.data import list_image_folder, load_image_entry

    with pytest.raises(UserError, match="EXIF rotation, which is not applied"):
        load_image_entry(list_image_folder(data)[0])


# --------------------------------------------------------------------------- prediction without masks


def test_photos_alone_are_segmented_not_scored(shared_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    image = sample(800, size=96)[0][:, :70]  # not square: masks must come back at 70x96
    Image.fromarray(image).save(photos / "eye.jpg", quality=95)
    Image.fromarray(image[..., 1]).save(photos / "grey.png")
    out = tmp_path / "pred"
    assert evaluate(shared_model, photos, out, "--save-probs") == 0
    said = capsys.readouterr().out
    assert "no metrics computed" in said and "has no masks/ folder" in said
    assert not (out / "results.json").exists() and not (out / "per_image.csv").exists()
    record = json.loads((out / "predictions.json").read_text())
    assert record["metrics"] is None and "no masks/ folder" in record["why_no_metrics"]
    for name in ("eye", "grey"):
        with Image.open(out / "masks" / f"{name}.png") as m:
            assert m.size == (70, 96) and m.mode == "L" and set(np.unique(np.asarray(m))) <= {0, 255}
        with Image.open(out / "probs" / f"{name}.png") as p:
            probs = np.asarray(p)
        with Image.open(out / "masks" / f"{name}.png") as m:
            vessel = np.asarray(m) > 0  # p > 0.5, so round(255 p) >= 128 inside and <= 128 outside
            assert (probs[vessel] >= 128).all() and (probs[~vessel] <= 128).all()
        with Image.open(out / "overlays" / f"{name}.png") as o:
            assert o.size[1] > 96  # the legend strip below the image
    assert record["per_image"]["eye"]["width"] == 70


def test_mixed_folder_is_refused_and_predict_skips_scoring(shared_model, tmp_path):
    data = tmp_path / "data"
    for k, name in enumerate(("a", "b")):
        image, mask, _ = sample(900 + k)
        save(data / "images" / f"{name}.png", image, "PNG")
        if name == "a":
            save(data / "masks" / f"{name}.png", grey(mask), "PNG")
    with pytest.raises(UserError, match=r"images/b.png has no mask .*pass --predict"):
        evaluate(shared_model, data, tmp_path / "out")
    assert evaluate(shared_model, data, tmp_path / "out", "--predict", "--overlays", "1") == 0
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "b.png"]
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["a.png"]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["why_no_metrics"] == "--predict was given"


def test_sixteen_bit_copy_gives_the_same_predictions(shared_model, tmp_path):
    image = sample(950, size=96)[0][..., 1]
    for kind, array in (("8", image), ("16", image.astype(np.uint16) * 257)):
        folder = tmp_path / f"in{kind}"
        folder.mkdir()
        Image.fromarray(array).save(folder / "angio.png")
        assert evaluate(shared_model, folder, tmp_path / f"out{kind}", "--save-probs") == 0
    for sub in ("masks", "probs"):
        assert (tmp_path / "out8" / sub / "angio.png").read_bytes() == (tmp_path / "out16" / sub / "angio.png").read_bytes()
    assert np.asarray(Image.open(tmp_path / "out8" / "masks" / "angio.png")).any()


# --------------------------------------------------------------------------- hub ids


def test_hub_id_resolves_through_a_local_cache(tiny_model, tmp_path, monkeypatch):
    from sa2va.hub import is_hub_id, resolve_model_path
    from sa2va.model import check_model_folder

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sa2va"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in tiny_model.iterdir():
        (snapshot / item.name).symlink_to(item)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: the cache or nothing
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)

    assert resolve_model_path("acme/tiny-sa2va") == snapshot
    check_model_folder("acme/tiny-sa2va")  # the checks every command runs accept the id
    with pytest.raises(UserError) as err:
        resolve_model_path("acme/absent")
    assert "acme/absent" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value) and str(tmp_path / "hub") in str(err.value)
    with pytest.raises(UserError, match="acme/absent"):
        evaluation.main(["--model", "acme/absent", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "models").mkdir()
    assert not is_hub_id("models/sa2va") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    assert is_hub_id("ByteDance/Sa2VA-4B")
    assert evaluation.default_out(snapshot) == Path("eval") / "tiny-sa2va"


# --------------------------------------------------------------------------- tables


def test_tables_stay_whole_in_a_narrow_log():
    from rich.console import Console

    from sa2va.console import print_whole

    summary = {m: {"mean": 3.9e-5, "ci_low": 1.234567, "ci_high": 2.345678, "median": 0.5, "std": 0.25,
                   "pooled": 0.125} for m in evaluation.METRICS}
    buf = io.StringIO()
    console = Console(file=buf, width=40, highlight=False)
    print_whole(console, evaluation.summary_table("a long title for a narrow log " * 2, summary))
    text = buf.getvalue()
    assert "…" not in text and "1.2346 to 2.3457" in text and "components error" in text
    assert console.width == 40  # restored after the table


def test_the_command_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "sa2va.datasets", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: source folder {tmp_path / 'nowhere'} does not exist"
