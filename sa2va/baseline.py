"""Build the demo's baseline: the tiny checkpoint fine-tuned (supervised) on synthetic vessels.

    python -m sa2va.baseline --out models/baseline [--steps 4000] [--seed 0] [--size 128] [--device cuda]

It plays the part of the user's `sa2va_vessel_hf`: a Sa2VA-format model already fine-tuned for
vessels and trained to convergence, from which preference training starts.

Loss: 2.0 BCE + 0.5 Dice on the mask SAM2 outputs, + 1.0 x SAM's IoU-prediction loss (MSE
between each multimask output's predicted IoU and its actual IoU with the truth). SAM2 outputs the
mask its IoU head ranks first; that argmax passes no gradient, so without this term the head stays
untrained, its scores tie, and the choice flips between float32 and bf16. The report records the
head's margin (`mask_choice`), and a baseline whose choice differs under bf16 autocast is refused.

Convergence: held-out Dice (n_val images of their own seeds) is measured every `eval_every`
steps; training stops when it has not beaten its best by at least `min_delta` for `patience`
evaluations in a row (or at `steps`), and the best weights are kept. The curve is in the
report (`curve`). Unlike the DPO
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
from .model import Sa2VA, SegInputs, encode_images, load_sa2va, prepare_images, sam_heads, upsample_logits
from .synth import make_sample
from .tiny import write_tiny_checkpoint

QUESTION = "Please segment the blood vessels."
ANSWER = "It is [SEG]."
IOU_WEIGHT = 1.0  # SAM's weight of the IoU-prediction MSE next to its mask losses
BF16_STEP = 2.0 ** -8  # bf16's spacing of values in [0.5, 1): closer IoU scores can tie under autocast


def hard_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    denom = pred.sum() + gt.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, gt).sum() / denom)


def actual_ious(multi_low: torch.Tensor, gt: torch.Tensor, sam_size: int) -> torch.Tensor:
    """IoU with the ground truth gt (1, 1, H, W) of each multimask output (K, h, w) at logit > 0,
    at the image's size: the IoU head's target, as SAM trains it. No gradient (a target)."""
    with torch.no_grad():
        masks = upsample_logits(multi_low[:, None], sam_size, tuple(gt.shape[-2:])) > 0
        truth = gt > 0.5
        inter = (masks & truth).flatten(1).sum(1).float()
        union = (masks | truth).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def iou_head_loss(ious: torch.Tensor, multi_low: torch.Tensor, gts: list[torch.Tensor], sam_size: int) -> torch.Tensor:
    """SAM's IoU-prediction loss: mean squared error between each multimask output's predicted
    IoU (ious (B, K)) and its actual IoU with the ground truth. The mask choice is an argmax over
    `ious`, through which no mask loss reaches the IoU head: this term is what trains it."""
    targets = torch.stack([actual_ious(multi_low[j], gt, sam_size) for j, gt in enumerate(gts)])
    return torch.nn.functional.mse_loss(ious.float(), targets)


@torch.no_grad()
def mask_choice(sa2va: Sa2VA, images: list[np.ndarray], batch: int = 8, question: str = QUESTION,
                answer: str = ANSWER) -> dict:
    """Which multimask output SAM2 picks on each image, in float32 and under bf16 autocast (on
    the model's device type), and the IoU head's margin (top predicted IoU minus the second, in
    float32). A float32 model; returns chosen indices, margins (min, median) and `agree`."""
    chosen32, chosen16, margins = [], [], []
    for start in range(0, len(images), batch):
        # The encoders run once, in float32: their outputs agree with bf16's (the [SEG] embedding
        # to ~2e-4), the choice is made in the heads, and bf16 convolutions are slow on CPUs.
        features = encode_images(sa2va, prepare_images(sa2va, images[start : start + batch]))
        ious = sam_heads(sa2va, features, question, answer)[2].float()
        with torch.autocast(sa2va.device.type, dtype=torch.bfloat16):
            ious16 = sam_heads(sa2va, features, question, answer)[2].float()
        top2 = ious.topk(2, dim=-1).values
        margins += (top2[:, 0] - top2[:, 1]).tolist()
        chosen32 += ious.argmax(-1).tolist()
        chosen16 += ious16.argmax(-1).tolist()
    return {"chosen_float32": chosen32, "chosen_bf16": chosen16, "agree": chosen32 == chosen16,
            "margin_min": float(np.min(margins)), "margin_median": float(np.median(margins)),
            "bf16_step": BF16_STEP}


def build_baseline(out: str | Path, steps: int = 4000, seed: int = 0, size: int = 128, n_train: int = 192,
                   n_val: int = 64, batch: int = 8, lr: float = 2e-3, log=print, eval_every: int = 50,
                   patience: int = 4, min_delta: float = 0.002, device: str = "cpu",
                   max_minutes: float | None = None) -> Path:
    """Train until held-out Dice stops improving and write the baseline folder; returns its path.
    Refuses a non-empty `out`."""
    if steps < 1 or n_train < batch or n_val < 1 or eval_every < 1 or patience < 1:
        raise UserError("need steps >= 1, n_train >= batch, n_val >= 1, eval_every >= 1 and patience >= 1")
    stop = (eval_every, patience, min_delta, device, max_minutes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # determinism over speed for a shipped artefact
    try:
        with atomic_dir(out) as target, tempfile.TemporaryDirectory() as work:
            return _build(Path(out), target, Path(work), steps, seed, size, n_train, n_val, batch, lr, log, stop)
    finally:
        torch.set_num_threads(threads)


def _build(final: Path, target: Path, work: Path, steps: int, seed: int, size: int, n_train: int, n_val: int,
           batch: int, lr: float, log, stop: tuple) -> Path:
    eval_every, patience, min_delta, device, max_minutes = stop
    started = time.perf_counter()
    torch.manual_seed(seed)
    tiny = write_tiny_checkpoint(work / "tiny", seed=seed)
    sa2va = load_sa2va(tiny, trust_remote_code=True, device=device, dtype="float32")
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
    masks = [torch.from_numpy(s[1].astype(np.float32))[None, None].to(sa2va.device) for s in train]
    generator = torch.Generator().manual_seed(seed)

    def validate() -> list[float]:
        from .model import predict_probabilities

        model.eval()
        probs = predict_probabilities(sa2va, [s[0] for s in val], batch_size=8, question=QUESTION, answer=ANSWER)
        model.train()
        return [hard_dice((p > 0.5) & fov, gt & fov) for p, (_, gt, fov) in zip(probs, val)]

    curve: list[dict] = []
    best, best_step, best_state, since_best, scores = -1.0, 0, None, 0, []
    model.train()
    stopped = "steps"
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=generator).tolist()
        batch_inputs = SegInputs.cat([inputs[i] for i in idx])
        out = sam_heads(sa2va, encode_images(sa2va, batch_inputs), QUESTION, ANSWER)
        multi, ious, low = out[0], out[2], out[3]  # all K masks, their predicted IoUs, the chosen one
        loss = 0.0
        for j, i in enumerate(idx):
            z = upsample_logits(low[j : j + 1], sa2va.sam_size, (size, size))
            loss = loss + 2.0 * bce_loss(z, masks[i]) + 0.5 * dice_loss(z, masks[i])
        loss = (loss / batch).mean() + IOU_WEIGHT * iou_head_loss(ious, multi, [masks[i] for i in idx], sa2va.sam_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            now = validate()
            curve.append({"step": step + 1, "val_dice": float(np.mean(now)), "loss": float(loss.item())})
            log(f"baseline step {step + 1}/{steps}: loss {loss.item():.4f}, held-out Dice {np.mean(now):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
            if np.mean(now) >= best + min_delta or best_state is None:
                best, best_step, since_best, scores = float(np.mean(now)), step + 1, 0, now
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
                if since_best >= patience:
                    log(f"converged: no gain of {min_delta} in held-out Dice for {patience} evaluations")
                    stopped = "converged"
                    break
            if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                log(f"time limit of {max_minutes} min: stopping before convergence")
                stopped = "time limit"
                break
    stopped_at = step + 1
    model.load_state_dict(best_state)  # the best evaluation's weights
    model.eval()
    model.requires_grad_(False)
    # The mask SAM2 outputs is the argmax of the IoU head: it must not depend on the precision
    # (under bf16 autocast near-tied scores round equal and an untrained mask can win).
    choice = mask_choice(sa2va, [s[0] for s in val])
    log(f"IoU-head margin (top minus second predicted IoU, float32) on {n_val} held-out images: "
        f"min {choice['margin_min']:.4f}, median {choice['margin_median']:.4f}")
    if not choice["agree"]:
        bad = sum(a != b for a, b in zip(choice["chosen_float32"], choice["chosen_bf16"]))
        raise UserError(f"{final}: the chosen mask differs between float32 and bf16 autocast on {bad} of {n_val} "
                        f"held-out images (IoU-head margin min {choice['margin_min']:.2g}); train longer (--steps)")
    model.to("cpu")
    model.save_pretrained(str(target))
    for item in tiny.iterdir():  # remote code, tokenizer, the original config.json
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, target / item.name)
    report = {"steps": steps, "stopped_at": stopped_at, "stopped_because": stopped, "best_step": best_step, "eval_every": eval_every,
              "patience": patience, "min_delta": min_delta, "device": str(sa2va.device), "curve": curve,
              "seed": seed, "size": size, "n_train": n_train, "n_val": n_val, "batch": batch,
              "lr": lr, "val_dice_mean": float(np.mean(scores)), "val_dice_min": float(np.min(scores)),
              "val_dice_max": float(np.max(scores)), "iou_weight": IOU_WEIGHT,
              "mask_choice": {k: choice[k] for k in ("margin_min", "margin_median", "bf16_step", "agree")} | {
                  "chosen_float32": sorted(set(choice["chosen_float32"]))},
              "seconds": round(time.perf_counter() - started, 1),
              "command": f"python -m sa2va.baseline --out {final} --steps {steps} --seed {seed} --size {size}"
                         f" --device {sa2va.device.type}"}
    (target / "baseline_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"baseline held-out Dice {report['val_dice_mean']:.4f} (step {best_step}) on {n_val} synthetic images "
        f"({report['seconds']:.0f} s)")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4000, help="at most this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=192)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    parser.add_argument("--patience", type=int, default=4, help="evaluations without a gain before stopping")
    parser.add_argument("--min-delta", type=float, default=0.002, help="the held-out Dice gain that counts")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--max-minutes", type=float, help="stop (keeping the best weights) after this long")
    args = parser.parse_args(argv)
    build_baseline(args.out, steps=args.steps, seed=args.seed, size=args.size, n_train=args.n_train, lr=args.lr,
                   eval_every=args.eval_every, patience=args.patience, min_delta=args.min_delta, device=args.device,
                   max_minutes=args.max_minutes)
    return 0


if __name__ == "__main__":
    run_cli(main)
