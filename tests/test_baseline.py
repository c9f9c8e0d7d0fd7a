"""The baseline builder: a loadable model, its report, and an IoU head that makes SAM2's mask
choice decisive (the same mask in float32 and under bf16 autocast)."""

import json

import torch


def test_baseline_builder_trains_a_decisive_mask_choice(tmp_path):
    from sa2va.baseline import BF16_STEP, build_baseline, mask_choice
    from sa2va.model import load_sa2va
    from sa2va.synth import make_sample

    out = build_baseline(tmp_path / "b", steps=12, n_train=2, n_val=2, batch=2, size=64, eval_every=12,
                         log=lambda *_: None)
    report = json.loads((out / "baseline_report.json").read_text())
    assert report["steps"] == 12 and 0.0 <= report["val_dice_mean"] <= 1.0
    assert report["mask_choice"]["agree"] and report["mask_choice"]["margin_min"] > BF16_STEP
    # The written model, on images it never saw: float32 and bf16 autocast pick the same mask,
    # by a margin bf16 cannot round away.
    sa2va = load_sa2va(out, trust_remote_code=True, device="cpu", dtype="float32")
    choice = mask_choice(sa2va, [make_sample(77, i, 64)[0] for i in range(2)])
    assert choice["agree"], choice
    assert choice["margin_min"] > BF16_STEP, choice


def test_iou_loss_reaches_the_iou_head_and_the_mask_loss_does_not(tiny_model):
    from sa2va.baseline import ANSWER, QUESTION, iou_head_loss
    from sa2va.losses import bce_loss
    from sa2va.model import encode_images, load_sa2va, prepare_images, sam_heads, upsample_logits
    from sa2va.synth import make_sample

    sa2va = load_sa2va(tiny_model, trust_remote_code=True, device="cpu", dtype="float32")
    head = sa2va.sam2.sam_mask_decoder.iou_prediction_head
    sa2va.sam2.sam_mask_decoder.requires_grad_(True)
    image, gt, _ = make_sample(5, 0, 64)
    mask = torch.from_numpy(gt.astype("float32"))[None, None]
    out = sam_heads(sa2va, encode_images(sa2va, prepare_images(sa2va, [image])), QUESTION, ANSWER)
    multi, ious, low = out[0], out[2], out[3]
    assert multi.shape[1] == ious.shape[1] == 3 and low.shape[1] == 1

    z = upsample_logits(low, sa2va.sam_size, gt.shape)
    bce_loss(z, mask).mean().backward(retain_graph=True)  # the chosen mask is an argmax of the IoUs
    assert all(p.grad is None for p in head.parameters())
    iou_head_loss(ious, multi, [mask], sa2va.sam_size).backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_float32_models_run_without_bf16_autocast_on_cuda():
    """model.dtype=float32 / evaluate.py --dtype float32 is the float32 regime of the results table."""
    import contextlib
    import warnings
    from types import SimpleNamespace

    from sa2va.model import autocast

    cuda = torch.device("cuda")
    assert isinstance(autocast(SimpleNamespace(device=cuda, dtype=torch.float32)), contextlib.nullcontext)
    with warnings.catch_warnings():  # without a GPU torch warns that it disables CUDA autocast
        warnings.simplefilter("ignore")
        assert isinstance(autocast(SimpleNamespace(device=cuda, dtype=torch.bfloat16)), torch.autocast)
    assert isinstance(autocast(SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)), contextlib.nullcontext)
