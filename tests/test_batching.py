"""The run plan: pairs per step split into micro-batches (auto from the memory model), compile
by default with a fallback, and a budget that cannot hold the model refused before it loads."""

import json

import pytest
import numpy as np
import torch

import train_dpo
from sa2va import batching
from sa2va.config import load_config
from sa2va.errors import UserError
from sa2va.tiny import preset_config_dict


def test_pairs_per_step_split_rules():
    v8 = load_config("v8")
    assert (v8.train.pairs_per_step, v8.train.micro_batch_size, v8.train.grad_accum) == (4, "auto", None)
    assert v8.train.compile == "auto"
    seed = load_config("v8", ["train.micro_batch_size=1", "train.grad_accum=4", "train.compile=false"])
    assert (seed.train.micro_batch_size, seed.train.grad_accum, seed.train.pairs_per_step) == (1, 4, 4)
    assert seed.train.compile is False
    override = load_config("v8", ["train.micro_batch_size=8", "train.grad_accum=2"])  # overrides beat the file
    assert (override.train.micro_batch_size, override.train.grad_accum, override.train.pairs_per_step) == (8, 2, 16)
    half = load_config("v8", ["train.micro_batch_size=2"])
    assert (half.train.micro_batch_size, half.train.grad_accum) == (2, 2)
    fixed_accum = load_config("v8", ["train.grad_accum=4"])
    assert (fixed_accum.train.micro_batch_size, fixed_accum.train.grad_accum) == (1, 4)
    explicit = load_config("tiny")  # micro_batch_size 2 x grad_accum 1 as written
    assert (explicit.train.micro_batch_size, explicit.train.grad_accum, explicit.train.pairs_per_step) == (2, 1, 2)
    for override, key in [(["train.micro_batch_size=3"], "train.micro_batch_size"),
                          (["train.micro_batch_size=two"], "train.micro_batch_size"),
                          (["train.micro_batch_size=0"], "train.micro_batch_size"),
                          (["train.grad_accum=3"], "train.grad_accum"),
                          (["train.pairs_per_step=8", "train.micro_batch_size=1", "train.grad_accum=4"],
                           "train.pairs_per_step"),
                          (["train.compile=sometimes"], "train.compile"),
                          (["train.memory_budget_gb=0"], "train.memory_budget_gb")]:
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            load_config("v8", override)


def _weightless(tmp_path, preset, attention=None):
    folder = tmp_path / f"{preset}-{attention}"
    folder.mkdir()
    config = preset_config_dict(preset)
    if attention:
        config["llm_config"]["attn_implementation"] = attention
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_memory_model_covers_the_measured_h200_peaks(tmp_path, monkeypatch):
    # docs/performance.md, eager, 284-token samples: 1.63 (4B) and 4.45 (26B) GiB per pair of a micro-batch,
    # measured with SDPA attention (the 26B shape's Qwen2 stand-in then).
    cfg = load_config("v8")
    for preset, measured in (("4b", 1.63), ("26b", 4.45)):
        shape = batching.read_shape(_weightless(tmp_path, preset, "sdpa"))
        model = batching.memory_model(shape, cfg.train, 16, "full", "cuda", 2, 1, False, [(512, 512)], 2)
        assert measured <= model.per_pair / batching.GIB <= 1.25 * measured, preset
        assert model.peak(8) > model.peak(4) > model.peak(1)
    internlm2 = _weightless(tmp_path, "26b")  # the release's config says eager; compat runs it through SDPA
    assert batching.read_shape(internlm2).eager_attention is False
    monkeypatch.setenv("SA2VA_DPO_ATTENTION", "eager")
    eager = batching.memory_model(batching.read_shape(internlm2), cfg.train, 16, "full", "cuda", 2,
                                  1, False, [(512, 512)], 2)
    assert eager.per_pair > model.per_pair  # the InternLM2 release's eager attention keeps its score matrices
    sharded = batching.memory_model(shape, cfg.train, 16, "full", "cuda", 2, 4, True, [(512, 512)], 2)
    assert sharded.train_weights < model.train_weights  # FSDP: a quarter of the LLM per rank


def test_auto_picks_the_largest_divisor_that_fits(tiny_model, tiny_pairs, tmp_path):
    cfg = load_config("tiny", [f"model.path={tiny_model}", f"data.root={tiny_pairs}", "train.micro_batch_size=auto",
                               "train.grad_accum=null", "train.pairs_per_step=4"])
    images = sorted((tiny_pairs / "images").glob("*.png"))
    cpu = torch.device("cpu")
    plan = batching.plan_run(cfg, cpu, 1, images, len(images))
    assert (plan.micro_batch, plan.grad_accum, plan.compile) == (4, 1, False)
    assert "auto on cpu" in plan.rows[0][2] and "eager on cpu" in plan.rows[1][2]
    # At the 4B shape on a GPU (config.json only; the budget given, so no GPU is asked), a budget
    # between the peaks of micro-batch 2 and 4 gives 2 x 2: the same 4 pairs per step.
    cfg.model.path = str(_weightless(tmp_path, "4b"))
    shape = batching.read_shape(cfg.model.path)
    model = batching.memory_model(shape, cfg.train, cfg.lora.r, cfg.loss.resolution, "cuda", 2, 1, False,
                                  batching.image_sizes(images), len(images))
    cfg.train.memory_budget_gb = (model.peak(2) + model.peak(4)) / 2 / batching.GIB
    plan = batching.plan_run(cfg, torch.device("cuda"), 1, images, len(images))
    assert (plan.micro_batch, plan.grad_accum, plan.compile) == (2, 2, True)
    assert "micro-batch 4 would need" in plan.rows[0][2]


def test_impossible_budget_is_refused_before_the_model_loads(tiny_model, tiny_pairs, tmp_path, capsys):
    with pytest.raises(UserError, match=r"train\.memory_budget_gb.*micro-batch 1"):
        train_dpo.main(["--cfg", "tiny", f"model.path={tiny_model}", f"data.root={tiny_pairs}",
                        f"output_dir={tmp_path / 'out'}", "train.micro_batch_size=auto", "train.grad_accum=null",
                        "train.memory_budget_gb=0.01"])
    assert "building the model" not in capsys.readouterr().out
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_compile_failure_falls_back_to_eager():
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]

    def probe():
        raise RuntimeError("no C compiler found\nsecond line")

    reason = batching.compile_layers(layers, probe)
    assert reason == "RuntimeError: no C compiler found"
    assert all(layer._compiled_call_impl is None for layer in layers)
    x = torch.randn(2, 4)
    assert torch.equal(layers[0](x), torch.nn.functional.linear(x, layers[0].weight, layers[0].bias))


def test_compile_for_inference_finds_every_encoder_block(tiny_model):
    """evaluate.py --compile: the LLM's decoder layers, the ViT's encoder layers and SAM2's Hiera
    blocks are all found in the release's layout (run 4 of issue 17 found only the LLM's); the
    compiled wrappers are removed again, so nothing here compiles (slow on CPU)."""
    from sa2va.model import load_sa2va

    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    expected = {"llm": len(sa2va.llm.model.layers), "vit": len(sa2va.model.vision_model.encoder.layer),
                "sam": len(sa2va.sam2.image_encoder.trunk_fpn.backbone.blocks)}
    assert min(expected.values()) > 0
    for part, count in expected.items():
        blocks = batching.compile_for_inference(sa2va, (part,))
        assert len(blocks) == count and all(b._compiled_call_impl is not None for b in blocks), part
        for block in blocks:
            block._compiled_call_impl = None


def test_threaded_preprocessing_gives_the_same_inputs(tiny_model, tiny_pairs):
    from sa2va.fileio import read_rgb
    from sa2va.model import load_sa2va, prepare_images
    from sa2va.pipeline import prepared_chunks

    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    images = [read_rgb(p) for p in sorted((tiny_pairs / "images").glob("*.png"))[:5]]
    images[1] = images[1][:, :90]  # another size and tile grid
    chunks = list(prepared_chunks(sa2va, images, batch_size=2, workers=3))
    assert [start for start, _ in chunks] == [0, 2, 4]
    for start, got in chunks:
        want = prepare_images(sa2va, images[start:start + 2])
        assert got.tiles == want.tiles and got.sizes == want.sizes
        assert torch.equal(got.vit_pixels, want.vit_pixels) and torch.equal(got.sam_pixels, want.sam_pixels)

    # predict_probabilities reads each chunk back one chunk late: every map, in order, the last
    # (short) chunk included, equal to the chunk done step by step
    from sa2va.model import encode_frozen, predict_probabilities, seg_logits, upsample_logits

    got = predict_probabilities(sa2va, images, batch_size=2)
    want = []
    with torch.no_grad():
        for start, inputs in chunks:
            low = seg_logits(sa2va, encode_frozen(sa2va, inputs), "Please segment the blood vessels.", "It is [SEG].")
            want += [torch.sigmoid(upsample_logits(low[i: i + 1], sa2va.sam_size, size))[0, 0].numpy()
                     for i, size in enumerate(inputs.sizes)]
    assert [g.shape for g in got] == [im.shape[:2] for im in images]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_qwen_vl_family_tokens_follow_the_pixel_count(tmp_path):
    from sa2va.tiny_qwen_vl import preset_config_dict as qwen_config

    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(qwen_config("qwen2_5_vl", "tiny")))
    shape = batching.read_shape(folder)  # dynamic resolution: 28 x 28 pixels per LLM token, clamped
    assert shape.pixel_unit == 28
    assert batching.tiles_for(shape, 64, 64) == shape.min_tiles // 28**2
    assert batching.tiles_for(shape, 200, 200) == -(-200 * 200 // 28**2)
    assert batching.tiles_for(shape, 4000, 4000) == shape.max_tiles // 28**2


def test_compile_for_inference_wraps_the_forward_blocks(tiny_model):
    from sa2va.model import load_sa2va

    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu")
    blocks = batching.compile_for_inference(sa2va, ("llm", "vit", "sam"))
    llm, vit = batching._blocks(sa2va.llm), batching._blocks(sa2va.model.vision_model, ("layers", "layer"))
    assert llm and vit and all(any(b is x for x in blocks) for b in llm + vit)
    assert len(blocks) > len(llm) + len(vit)  # SAM2's Hiera blocks too
    assert all(b._compiled_call_impl is not None for b in blocks)
