"""Build the demo's baseline: the tiny checkpoint fine-tuned (supervised) on synthetic vessels.

    python -m sa2va.baseline --out models/baseline [--steps 600] [--seed 0] [--size 128]

It plays the part of the user's `sa2va_vessel_hf`: a Sa2VA-format model already fine-tuned for
vessels, competent but imperfect, from which preference training starts. Unlike the DPO
recipe, this "pre-training" also trains the SAM2 image encoder: the tiny checkpoint's encoder
starts random, and a real Sa2VA's does not. The LLM and ViT stay frozen.

Training images come from synthetic seeds of their own (1000 + seed), never the demo's data.
Deterministic for a seed on one machine and software stack (single-threaded).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, run_cli
from .fileio import atomic_dir
from .losses import bce_loss, dice_loss
from .model import encode_images, load_sa2va, prepare_images, seg_logits, upsample_logits
from .synth import make_sample
from .tiny import write_tiny_checkpoint

QUESTION = "Please segment the blood vessels."
ANSWER = "It is [SEG]."


def hard_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    denom = pred.sum() + gt.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, gt).sum() / denom)


def build_baseline(out: str | Path, steps: int = 600, seed: int = 0, size: int = 128, n_train: int = 192,
                   n_val: int = 32, batch: int = 8, lr: float = 2e-3, log=print) -> Path:
    """Train and write the baseline folder; returns its path. Refuses a non-empty `out`."""
    if steps < 1 or n_train < batch or n_val < 1:
        raise UserError("need steps >= 1, n_train >= batch and n_val >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # determinism over speed for a shipped artefact
    try:
        with atomic_dir(out) as target, tempfile.TemporaryDirectory() as work:
            return _build(Path(out), target, Path(work), steps, seed, size, n_train, n_val, batch, lr, log)
    finally:
        torch.set_num_threads(threads)


def _build(final: Path, target: Path, work: Path, steps: int, seed: int, size: int, n_train: int, n_val: int,
           batch: int, lr: float, log) -> Path:
    started = time.perf_counter()
    torch.manual_seed(seed)
    tiny = write_tiny_checkpoint(work / "tiny", seed=seed)
    sa2va = load_sa2va(tiny, trust_remote_code=True, device="cpu", dtype="float32")
    model = sa2va.model
    model.requires_grad_(False)
    sam2 = sa2va.sam2
    trained = [sam2.image_encoder, sam2.sam_mask_decoder, model.text_hidden_fcs]
    for module in trained:
        module.requires_grad_(True)
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))

    samples = [make_sample(1000 + seed, i, size) for i in range(n_train + n_val)]
    train, val = samples[:n_train], samples[n_train:]
    inputs = [prepare_images(sa2va, [s[0]]) for s in train]  # preprocessing once; encoders run every step
    masks = [torch.from_numpy(s[1].astype(np.float32))[None, None] for s in train]
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=generator).tolist()
        batch_inputs = _cat_inputs([inputs[i] for i in idx])
        low = seg_logits(sa2va, encode_images(sa2va, batch_inputs), QUESTION, ANSWER)
        loss = 0.0
        for j, i in enumerate(idx):
            z = upsample_logits(low[j : j + 1], sa2va.sam_size, (size, size))
            loss = loss + 2.0 * bce_loss(z, masks[i]) + 0.5 * dice_loss(z, masks[i])
        loss = (loss / batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step == 0:
            log(f"baseline step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    model.requires_grad_(False)

    with torch.no_grad():
        from .model import predict_probabilities

        probs = predict_probabilities(sa2va, [s[0] for s in val], batch_size=8, question=QUESTION, answer=ANSWER)
    scores = [hard_dice((p > 0.5) & fov, gt & fov) for p, (_, gt, fov) in zip(probs, val)]
    model.save_pretrained(str(target))
    for item in tiny.iterdir():  # remote code, tokenizer, the original config.json
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, target / item.name)
    report = {"steps": steps, "seed": seed, "size": size, "n_train": n_train, "n_val": n_val, "batch": batch,
              "lr": lr, "val_dice_mean": float(np.mean(scores)), "val_dice_min": float(np.min(scores)),
              "val_dice_max": float(np.max(scores)), "seconds": round(time.perf_counter() - started, 1),
              "command": f"python -m sa2va.baseline --out {final} --steps {steps} --seed {seed} --size {size}"}
    (target / "baseline_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"baseline held-out Dice {report['val_dice_mean']:.4f} on {n_val} synthetic images "
        f"({report['seconds']:.0f} s)")
    return final


def _cat_inputs(parts):
    from .model import SegInputs

    return SegInputs(torch.cat([p.vit_pixels for p in parts]), [t for p in parts for t in p.tiles],
                     torch.cat([p.sam_pixels for p in parts]), [s for p in parts for s in p.sizes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=192)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    build_baseline(args.out, steps=args.steps, seed=args.seed, size=args.size, n_train=args.n_train, lr=args.lr)
    return 0


if __name__ == "__main__":
    run_cli(main)
