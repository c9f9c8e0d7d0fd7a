"""Native resolution: tile layout, blending, the ceiling, refusals, and tiled training and
evaluation end to end on the tiny checkpoint (real loading, real files)."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_ok

from sa2va import tiling
from sa2va.config import load_config
from sa2va.errors import UserError
from sa2va.metrics import image_metrics
from sa2va.synth import make_sample, write_dataset, write_dilated_pairs


@pytest.mark.parametrize("height,width,size,overlap", [(584, 565, 128, 32), (584, 565, 256, 32), (128, 128, 64, 16),
                                                       (100, 300, 64, 0), (40, 70, 64, 16), (97, 33, 32, 15)])
def test_tiles_cover_the_image_exactly(height, width, size, overlap):
    lay = tiling.layout(height, width, tiling.Tiling(size, overlap))
    count = np.zeros((height, width), int)
    for y0, y1, x0, x1 in lay.boxes:
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
        # a tile is the full tile side, unless the image is narrower than a tile along that axis
        assert y1 - y0 == min(size, height) and x1 - x0 == min(size, width)
        count[y0:y1, x0:x1] += 1
    assert count.min() >= 1
    for length in (height, width):  # neighbours share at least the overlap asked for
        starts = tiling.axis_starts(length, size, overlap)
        assert starts[0] == 0 and min(starts[-1] + size, length) == length
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))


def test_blending_a_constant_gives_the_constant_and_the_window_is_smooth():
    lay = tiling.layout(584, 565, tiling.Tiling(128, 32))
    maps = [torch.full((y1 - y0, x1 - x0), 2.5) for y0, y1, x0, x1 in lay.boxes]
    assert torch.allclose(tiling.blend(maps, lay), torch.full((584, 565), 2.5), atol=1e-6)
    w = tiling.window(lay.boxes[len(lay.boxes) // 2], lay)
    assert w.min() > 0 and w.max() == 1.0
    assert np.abs(np.diff(w, axis=0)).max() < 0.1 and np.abs(np.diff(w, axis=1)).max() < 0.1  # no step
    # Two tiles with different values: the blend moves from one to the other without a jump.
    two = tiling.layout(64, 100, tiling.Tiling(64, 24))
    left, right = torch.zeros(64, 64), torch.ones(64, 64)
    row = tiling.blend([left, right], two)[0].numpy()
    assert row[0] == 0 and row[-1] == 1 and np.all(np.diff(row) >= 0) and np.abs(np.diff(row)).max() < 0.15


def _lines(size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[5::7, :] = True  # 1-px horizontal lines
    mask[:, 3::11] = True  # 1-px vertical lines
    idx = np.arange(size)
    mask[idx, idx] = True  # a 1-px diagonal
    return mask


def test_ceiling_of_one_pixel_lines_is_lost_untiled_and_perfect_with_fine_tiles():
    mask = _lines(256)
    # A model with a 64x64 logit grid (SAM2 input 256 px): 4 px per cell untiled.
    untiled = tiling.ceiling_mask(mask, 64, 256, None)
    tiled = tiling.ceiling_mask(mask, 64, 256, tiling.Tiling(64, 16))
    assert image_metrics(untiled, mask)["dice"] < 0.9
    assert image_metrics(tiled, mask)["dice"] == 1.0 and image_metrics(tiled, mask)["cldice"] == 1.0


def test_tiling_keys_are_refused_by_name():
    with pytest.raises(UserError, match="tiling.size must be at least 32"):
        load_config("tiny", ["tiling.size=16"])
    with pytest.raises(UserError, match="tiling.overlap must be less than half"):
        load_config("tiny", ["tiling.size=128", "tiling.overlap=64"])
    with pytest.raises(UserError, match="tiling.size"):
        load_config("tiny", ["tiling.size=big"])
    assert load_config("tiny", ["tiling.size=auto"]).tiling.size == "auto"
    assert load_config("tiny").tiling.size is None  # off by default: today's behaviour
    with pytest.raises(UserError, match="tiling.overlap must be less than half of the tile side"):
        tiling.resolve("auto", 64, 128)  # auto = the grid side, known only with the model
    from sa2va.evaluation import main

    with pytest.raises(UserError, match="--tile-size must be at least 32"):
        main(["--ceiling", "--data", "nowhere", "--tile-size", "8"])
    with pytest.raises(UserError, match="--tile-overlap must be less than half"):
        main(["--ceiling", "--data", "nowhere", "--tile-size", "64", "--tile-overlap", "32"])


def test_realistic_widths_at_drive_size():
    from scipy import ndimage
    from skimage.morphology import skeletonize

    image, mask, fov = make_sample(0, 0, 584, "realistic", 565)
    assert image.shape == (584, 565, 3) and mask.shape == fov.shape == (584, 565)
    width = 2 * ndimage.distance_transform_edt(mask)[skeletonize(mask)] - 1  # local width at the centre line
    assert width.min() <= 1.0  # capillaries 1 px wide
    assert 6 <= np.percentile(width, 99.5) <= 10  # trunks 7-9 px
    # The scaled mode is today's generator: same sample as without the new arguments.
    assert np.array_equal(make_sample(3, 1, 96)[1], make_sample(3, 1, 96, "scaled")[1])


def test_an_image_within_one_tile_equals_the_untiled_forward(tiny_model):
    from sa2va.model import load_sa2va, predict_probabilities

    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    images = [make_sample(0, i, 64)[0][:, :50] for i in range(2)]  # 64x50, inside one 64 px tile
    untiled = predict_probabilities(sa2va, images, batch_size=2)
    tiled = tiling.predict_probabilities(sa2va, images, tiling.Tiling(64, 16), batch_size=2)
    for a, b in zip(untiled, tiled):
        assert a.shape == b.shape == (64, 50) and np.array_equal(a, b)


def test_tiled_evaluation_runs_on_both_paths(tiny_model, tmp_path):
    from sa2va.evaluation import main

    data = write_dataset(tmp_path / "data", n=1, size=96, seed=3)
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--trust-remote-code",
                 "--path", "both", "--tile-size", "64", "--tile-overlap", "16", "--n-boot", "10",
                 "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tiling"] == {"size": 64, "overlap": 16}
    assert set(results["paths"]) == {"forward", "generate"}
    assert 0.0 <= results["agreement"]["mean_dice"] <= 1.0
    # The ceiling needs no model; the tiny model's folder only sets the grid (512 px -> 128).
    assert main(["--ceiling", "--data", str(data), "--model", str(tiny_model), "--out", str(tmp_path / "c"),
                 "--n-boot", "10"]) == 0
    ceiling = json.loads((tmp_path / "c" / "results.json").read_text())["ceiling"]
    assert ceiling["logit_grid"] == 128 and ceiling["tiling"]["size"] == 128
    assert ceiling["tiled"]["metrics"]["dice"]["mean"] >= ceiling["untiled"]["metrics"]["dice"]["mean"]


def test_tiled_training_runs_end_to_end(tiny_model, tmp_path):
    pairs = write_dilated_pairs(tmp_path / "pairs", n=2, size=96, seed=5)
    out = tmp_path / "run"
    log = run_ok([sys.executable, "train_dpo.py", "--cfg", "tiny", f"model.path={tiny_model}", f"data.root={pairs}",
                  f"data.val_root={pairs}", "data.val_max_images=1", f"output_dir={out}", "max_steps=2",
                  "train.micro_batch_size=2", "train.save_every=0", "tiling.size=64", "tiling.overlap=16"])
    assert "2 pairs -> 8 tile pairs" in log  # a 96 px image is 2 x 2 tiles of 64 px
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and 0.0 <= records[0]["val_dice"] <= 1.0
    assert records[-1]["step"] == 2 and np.isfinite(records[-1]["loss"])
    assert (out / "final" / "config.json").is_file()


def test_curation_predicts_through_tiles(tiny_model, tmp_path, capsys, monkeypatch):
    import curate_data

    seen = []  # a spy on the real function: which tilings the model source asked for
    original = tiling.tiled_logits
    monkeypatch.setattr(tiling, "tiled_logits", lambda sa2va, images, t, *a: seen.append(t) or original(
        sa2va, images, t, *a))

    data = write_dataset(tmp_path / "data", n=1, size=96, seed=4)
    common = ["--data", str(data), "--rejected", "model", "--model", str(tiny_model), "--trust-remote-code",
              "--min-gap", "0.01", "--device", "cpu", "--dry-run"]
    with pytest.raises(UserError, match="--tile-size must be at least 32"):
        curate_data.main(common + ["--tile-size", "8"])  # refused before the model loads
    assert curate_data.main(common + ["--tile-size", "64", "--tile-overlap", "16"]) == 0
    assert "1 found" in capsys.readouterr().out
    assert seen == [tiling.Tiling(64, 16)]
