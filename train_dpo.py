"""Preference (and supervised) fine-tuning of Sa2VA's [SEG] -> mask path.

    torchrun --nproc_per_node 4 train_dpo.py --cfg configs/v8.yaml [key.sub=value ...] [--resume]

The whole algorithm is in `train` below, top to bottom:
  1. config (validated), distributed setup, output folder checked;
  2. pairs read and checked, model loaded, LoRA added, everything else frozen;
  3. frozen work once: ViT and SAM2 image-encoder features of every image, and (for mask DPO
     and GRPO) the reference model's logits of every pair, all before the first step;
  4. the policy (LLM + text_hidden_fcs + mask decoder) wrapped in DDP or FSDP2;
  5. the loop: gradient accumulation with no_sync, bf16 autocast on GPU, clipping, AdamW,
     warm-up + cosine, NaN/inf steps skipped, metrics all-reduced and logged on rank 0,
     held-out Dice, atomic checkpoints, --resume; online DPO remakes the rejected masks from
     the policy every data.refresh_every steps (sa2va.online), GRPO samples masks in its loss;
  6. the final export: a full HF folder with LoRA merged (OUTPUT/final).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.utils.data.distributed import DistributedSampler

from sa2va import batching
from sa2va import checkpoint as ckpt
from sa2va import distributed as dist
from sa2va import online
from sa2va import tiling
from sa2va.config import DEFAULT_CONFIG, Config, load_config, to_yaml
from sa2va.data import PairDataset, list_image_folder, load_image_entry, masks_to_tensor, read_pairs
from sa2va.errors import UserError, run_cli
from sa2va.fileio import atomic_path, check_writable_dir
from sa2va.losses import combined_loss
from sa2va.model import (
    FrozenFeatures,
    SegPolicy,
    Sa2VA,
    add_lora_and_freeze,
    autocast,
    encode_frozen,
    freeze_unreachable,
    load_sa2va,
    parameter_table,
    prepare_images,
    projector_trained,
    upsample_logits,
)
from sa2va.pipeline import prepared_chunks, to_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=str(DEFAULT_CONFIG), help="YAML config (a path, or a name under configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-6 max_steps=4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    info = dist.init_distributed(cfg.device, cfg.dist.backend)
    try:
        train(cfg, info, resume=args.resume)
    finally:
        dist.shutdown()
    return 0


# --------------------------------------------------------------------------- helpers


def log0(info: dist.DistInfo, *parts: Any) -> None:
    if info.is_main:
        from rich import print as rprint

        rprint(*parts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float, min_ratio: float):
    """Linear warm-up, then cosine decay to min_ratio of the peak."""
    warmup = max(1, int(round(warmup_ratio * total_steps))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def encode_all(sa2va: Sa2VA, images: list[np.ndarray], batch: int, info: dist.DistInfo, what: str,
               on_device: bool = True) -> list[FrozenFeatures]:
    """Frozen encoder features of each image, computed once, kept on the device or the CPU
    (images prepared in threads a chunk ahead, as evaluation's forward path does)."""
    keep = sa2va.device if on_device else torch.device("cpu")
    out: list[FrozenFeatures] = []
    with progress(info, f"encoding {what}", len(images)) as advance:
        for _, inputs in prepared_chunks(sa2va, images, batch):
            with autocast(sa2va):
                feats = encode_frozen(sa2va, to_device(inputs, sa2va.device)).to(keep)
            out.extend(feats.select([i]) for i in range(len(inputs.tiles)))
            advance(len(inputs.tiles))
    return out


class progress:
    """A rich progress bar on rank 0; a no-op elsewhere."""

    def __init__(self, info: dist.DistInfo, label: str, total: int):
        self.enabled, self.label, self.total = info.is_main, label, total

    def __enter__(self):
        if not self.enabled:
            return lambda n=1, **kw: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total, info="")
        return lambda n=1, info="": self.bar.update(task, advance=n, info=info)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def at_loss_resolution(logits: torch.Tensor, sa2va: Sa2VA, size: tuple[int, int], resolution: str) -> torch.Tensor:
    """Low-res logits (N, 1, h, w) at the loss resolution (see LossConfig.resolution)."""
    return upsample_logits(logits, sa2va.sam_size, size) if resolution == "full" else logits.float()


def pair_losses(cfg: Config, sa2va: Sa2VA, logits: torch.Tensor, chosen: list[torch.Tensor],
                rejected: list[torch.Tensor], refs: list[torch.Tensor] | None,
                sampling: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Loss per pair (B,) and the summed logged metrics (tensors: no host sync here).

    One policy forward gave `logits` for the micro-batch; chosen and rejected are scored on it.
    Pairs whose masks share a size go through one upsample and one loss call.
    """
    by_size: dict[tuple[int, int], list[int]] = {}
    for j, mask in enumerate(chosen):
        by_size.setdefault(tuple(mask.shape[-2:]), []).append(j)
    losses = torch.empty(len(chosen), device=sa2va.device)
    sums: dict[str, torch.Tensor] = {}
    for size, js in by_size.items():
        z = at_loss_resolution(logits[js], sa2va, size, cfg.loss.resolution)
        zref = None
        if refs is not None:
            zref = at_loss_resolution(torch.stack([refs[j] for j in js]).to(sa2va.device), sa2va, size,
                                      cfg.loss.resolution)
        w = torch.stack([chosen[j] for j in js]).to(sa2va.device, torch.float32)  # masks may be uint8 on the GPU
        l = torch.stack([rejected[j] for j in js]).to(sa2va.device, torch.float32)
        group_losses, parts = combined_loss(cfg.loss, z, w, l, zref, sampling)
        losses = losses.index_put((torch.tensor(js, device=sa2va.device),), group_losses)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.sum()
    return losses, sums


@torch.no_grad()
def held_out_dice(policy: SegPolicy, sa2va: Sa2VA, feats: list[FrozenFeatures], masks: list[np.ndarray],
                  fovs: list[np.ndarray | None], layouts: list[tiling.Layout], batch: int) -> float:
    """Mean hard Dice (threshold 0.5, FOV-restricted) on the held-out images.

    feats holds one entry per tile of every image in order (one per image when untiled); each
    image's tile logits are blended back at its own size (tiling.assemble)."""
    policy.eval()  # no LoRA dropout: a deterministic number, and no RNG drawn
    lows = []
    for start in range(0, len(feats), batch):
        chunk = FrozenFeatures.cat(feats[start : start + batch]).to(sa2va.device)
        with autocast(sa2va):
            lows.append(policy(chunk).float())
    low = torch.cat(lows)
    scores, at = [], 0
    for gt, fov, lay in zip(masks, fovs, layouts):
        pred = (tiling.assemble(low[at : at + len(lay.boxes)], sa2va.sam_size, lay) > 0).cpu().numpy()
        at += len(lay.boxes)
        if fov is not None:
            pred, gt = pred[fov], gt[fov]
        tp = np.logical_and(pred, gt).sum()
        denom = pred.sum() + gt.sum()
        scores.append(1.0 if denom == 0 else 2 * tp / denom)
    return float(np.mean(scores))


# --------------------------------------------------------------------------- the algorithm


def train(cfg: Config, info: dist.DistInfo, resume: bool = False) -> None:
    out = Path(cfg.output_dir)
    error = None
    if info.is_main:
        try:
            check_writable_dir(out)  # before any long work: a full or read-only disk fails now
        except UserError as err:
            error = str(err)
    error = dist.broadcast_object(error)  # every rank stops, only rank 0 prints
    if error:
        if not info.is_main:
            raise SystemExit(2)
        raise UserError(error)
    if not resume and ckpt.latest_checkpoint(out) is not None:
        # A fresh run would prune the older run's higher-numbered checkpoints, and its own.
        raise UserError(f"{out} holds the checkpoints of an earlier run (newest: {ckpt.latest_checkpoint(out).name}); "
                        "pass --resume to continue it, or choose another output_dir")
    seed_everything(cfg.train.seed)

    # 2. Data and model. Every pair is checked now, not at step 300.
    entries = read_pairs(cfg.data.root, cfg.data.annotations, cfg.data.max_samples)
    dataset = PairDataset(entries)
    val_images = read_validation(cfg) if cfg.data.val_root else None
    # The micro-batch (train.micro_batch_size: auto) and compile, chosen before any weight is read.
    plan = batching.plan_run(cfg, info.device, info.world_size, [e.image for e in entries], len(entries))
    cfg.train.micro_batch_size, cfg.train.grad_accum = plan.micro_batch, plan.grad_accum
    if info.is_main:
        batching.print_plan(plan.rows)
    sa2va = load_sa2va(cfg.model.path, cfg.model.trust_remote_code, device=str(info.device), dtype=cfg.model.dtype,
                       random_weights=cfg.model.random_weights)
    add_lora_and_freeze(sa2va, cfg.lora, cfg.train_modules)
    if info.is_main:
        print_parameter_table(sa2va)
    policy = SegPolicy(sa2va, cfg.model.question, cfg.model.answer)

    samples = [dataset[i] for i in range(len(dataset))]
    image_paths = [str(e.image) for e in entries]
    tiles = tiling.from_config(cfg.tiling, sa2va)
    if tiles is not None:
        # Native resolution: each pair becomes one pair per tile, image and masks cut alike.
        samples, image_paths = tiling.tile_pairs(samples, image_paths, tiles)
        dataset = samples
        log0(info, f"tiles of {tiles.size} px, overlap {tiles.overlap} px: {len(entries)} pairs -> "
                   f"{len(samples)} tile pairs")
    low = (sa2va.low_res, sa2va.low_res)
    size = None if cfg.loss.resolution == "full" else low
    chosen = [masks_to_tensor([s["chosen"]], size)[0] for s in samples]
    rejected = [masks_to_tensor([s["rejected"]], size)[0] for s in samples]
    on_gpu = info.device.type == "cuda" and cfg.train.cache_on_device
    if on_gpu:  # 0/1 masks as uint8 on the GPU: no host-to-device copy per micro-batch
        chosen = [m.to(info.device, torch.uint8) for m in chosen]
        rejected = [m.to(info.device, torch.uint8) for m in rejected]
    # Several pairs often share an image (rejected masks at several thresholds): encode it once.
    unique_paths = list(dict.fromkeys(image_paths))
    position = {p: i for i, p in enumerate(unique_paths)}
    image_of_pair = [position[p] for p in image_paths]
    first_pair = {image_of_pair[i]: i for i in reversed(range(len(samples)))}
    images = [samples[first_pair[u]]["image"] for u in range(len(unique_paths))]

    # 3. Frozen work once (every rank encodes every image: no traffic, and ranks see all
    #    images across epochs). With cache_frozen=false the encoders rerun every step.
    batch = cfg.train.micro_batch_size
    features = (encode_all(sa2va, images, max(batch, 4), info, "images", cfg.train.cache_on_device)
                if cfg.train.cache_frozen else None)

    def batch_features(indices: list[int]) -> FrozenFeatures:
        if features is not None:
            return FrozenFeatures.cat([features[image_of_pair[i]] for i in indices]).to(sa2va.device)
        with autocast(sa2va):
            return encode_frozen(sa2va, prepare_images(sa2va, [images[image_of_pair[i]] for i in indices]))

    # The reference policy is the starting model; its logits depend only on the pair, so
    # they are computed once here (before any step, so the LoRA B matrices are still zero
    # and text_hidden_fcs / mask decoder are their starting copies).
    ref_logits: list[torch.Tensor] | None = None
    # Also for dice_dpo: the rewards and KL are how a user sees what preference training did.
    if cfg.loss.mask_dpo > 0 or cfg.loss.dice_dpo > 0 or cfg.loss.grpo > 0:
        ref_file = out / "reference_logits.pt"
        if resume and ref_file.is_file():
            ref_logits = list(torch.load(ref_file, map_location="cpu", weights_only=True))
        else:
            # The reference logits depend on the image only (chosen/rejected are not inputs).
            ref_logits = []
            first_pairs = [first_pair[u] for u in range(len(images))]
            policy.eval()  # no LoRA dropout: a deterministic reference that draws no random numbers
            with progress(info, "reference logits", len(images)) as advance, torch.no_grad():
                for start in range(0, len(images), max(batch, 4)):
                    idx = first_pairs[start : start + max(batch, 4)]
                    with autocast(sa2va):
                        z = policy(batch_features(idx)).float().cpu()
                    ref_logits.extend(z[i] for i in range(len(idx)))
                    advance(len(idx))
            if info.is_main:
                with atomic_path(ref_file) as tmp:
                    torch.save(torch.stack(ref_logits), tmp)
        if on_gpu:
            ref_logits = [z.to(info.device) for z in ref_logits]

    val = None
    if val_images is not None:
        layouts = [tiling.layout(x[0].shape[0], x[0].shape[1], tiles) for x in val_images]
        pieces = [c for x, lay in zip(val_images, layouts) for c in tiling.crops(x[0], lay)]
        feats = encode_all(sa2va, pieces, 4, info, "held-out images", cfg.train.cache_on_device)
        val = (feats, [x[1] for x in val_images], [x[2] for x in val_images], layouts)
    if cfg.train.cache_frozen and info.device.type == "cuda":
        # Every image is encoded: the frozen encoders (6B ViT + SAM2 at 26B) can leave the GPU.
        sa2va.vision.to("cpu")
        if projector_trained(sa2va):  # Qwen-VL's trained merger sits inside the vision tower
            sa2va.family.projector(sa2va.model).to(info.device)
        sa2va.sam2.image_encoder.to("cpu")
        torch.cuda.empty_cache()

    unreachable = freeze_unreachable(policy, batch_features([0]), sa2va)
    if unreachable:
        groups = sorted({n.rsplit(".", 2)[0] for n in unreachable})
        log0(info, f"frozen, no mask loss reaches them: {', '.join(groups)}")

    # 4. Wrap what trains.
    if cfg.train.activation_checkpointing:
        sa2va.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.compile:  # per layer: one graph reused 24-48 times, quick to compile
        started = time.perf_counter()
        probe_pairs = list(range(min(batch, len(samples))))
        failed = batching.compile_layers(policy.decoder_layers(),
                                         lambda: batching.probe_backward(policy, batch_features(probe_pairs), sa2va))
        if failed:
            log0(info, f"[yellow]compile: failed ({failed}); training eager (train.compile=false skips the attempt)")
        else:
            log0(info, f"compile: {len(policy.decoder_layers())} LLM layers compiled in "
                       f"{time.perf_counter() - started:.0f} s")
    wrapped = dist.wrap_policy(policy, cfg.dist.strategy, info, policy.decoder_layers(), cfg.dist.fsdp_gather)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    fused = cfg.optim.fused and info.device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=tuple(cfg.optim.betas), fused=fused)

    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=cfg.train.seed, drop_last=True)
    micro_per_epoch = len(sampler) // batch
    steps_per_epoch = micro_per_epoch // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} pairs over {info.world_size} ranks cannot fill one step of "
                        f"micro_batch_size {batch} x grad_accum {cfg.train.grad_accum}")
    total_steps = cfg.max_steps or cfg.train.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio))
    state_options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    # GRPO's mask samples draw from their own RNG, one stream per rank; online DPO's sampled
    # rejected masks from one stream that is the same on every rank (every rank makes the same
    # pairs). Both are saved in every checkpoint.
    sampling = torch.Generator(device=info.device).manual_seed(cfg.train.seed + 7919 * info.rank)
    refresh_rng = torch.Generator(device=info.device).manual_seed(cfg.train.seed)

    def refresh_pairs() -> dict[str, float]:
        """Online DPO: every pair's rejected mask remade from the current policy (sa2va.online)."""
        policy.eval()  # no LoRA dropout: every rank makes the same masks
        firsts = [first_pair[u] for u in range(len(images))]
        image_logits = []
        with torch.no_grad():
            for start in range(0, len(images), max(batch, 4)):
                idx = firsts[start : start + max(batch, 4)]
                with autocast(sa2va):
                    z = policy(batch_features(idx))
                image_logits.extend(at_loss_resolution(z[i : i + 1], sa2va, tuple(chosen[j].shape[-2:]),
                                                       cfg.loss.resolution)[0] for i, j in enumerate(idx))
        wrapped.train()
        rejected[:], stats = online.refresh_rejected(
            image_logits, image_of_pair, chosen, rejected, cfg.data.refresh_thresholds, cfg.data.refresh_samples,
            cfg.data.refresh_min_gap, refresh_rng)
        return stats

    step, best_dice, bad_in_a_row, skipped_total = 0, -1.0, 0, 0
    if resume:
        last = ckpt.latest_checkpoint(out)
        if last is None:
            log0(info, f"[yellow]--resume: no complete checkpoint in {out}/checkpoints; starting fresh")
        else:
            trained = ckpt.load_trained(last)
            state = ckpt.load_training_state(last)
            policy_state = {policy.from_model_name(k): v for k, v in trained.items()}
            set_state_dict(wrapped, optimizer, model_state_dict=policy_state,
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
            scheduler.load_state_dict(state["scheduler"])
            rank_rng = state["rng"][min(info.rank, len(state["rng"]) - 1)]
            ckpt.set_rng_state(rank_rng)
            if "sampling" in rank_rng:
                sampling.set_state(rank_rng["sampling"])
                refresh_rng.set_state(rank_rng["refresh"])
            if "rejected" in state:  # online DPO: the rejected masks in force at this step
                rejected[:] = [m.to(r.device, r.dtype) for m, r in zip(online.unpack_masks(state["rejected"]), rejected)]
            meta = json.loads((last / "trainer_state.json").read_text())
            step, best_dice = meta["step"], meta.get("best_dice", -1.0)
            skipped_total = meta.get("skipped_steps", 0)
            if info.is_main:
                truncate_jsonl(out / "metrics.jsonl", step)
            log0(info, f"resumed from {last} at step {step}")
    if step == 0 and info.is_main:
        truncate_jsonl(out / "metrics.jsonl", 0)  # lines of a run cut off before its first checkpoint

    def save(name_step: int, best: bool = False) -> None:
        model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=state_options)
        rngs = dist.all_gather_objects({**ckpt.rng_state(), "sampling": sampling.get_state(),
                                        "refresh": refresh_rng.get_state()})
        if info.is_main:
            trained = {policy.to_model_name(k): v for k, v in model_sd.items()}
            meta = {"step": name_step, "total_steps": total_steps, "epoch": name_step // steps_per_epoch,
                    "samples_seen": name_step * batch * cfg.train.grad_accum * info.world_size,
                    "best_dice": best_dice, "skipped_steps": skipped_total, "world_size": info.world_size,
                    "base_model": str(Path(sa2va.path).resolve())}  # the folder loaded (a hub id: its snapshot)
            training_state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "rng": rngs}
            if cfg.data.refresh_every:
                training_state["rejected"] = online.pack_masks(rejected)
            target = ckpt.save_checkpoint(out, name_step, trained, sa2va.llm, training_state,
                                          meta, to_yaml(cfg), cfg.train.keep_checkpoints, best=best)
            log0(info, f"saved {target}")
        dist.barrier()

    # 5. The loop.
    metrics_file = out / "metrics.jsonl"
    if val is not None and step == 0:
        # The starting model's held-out Dice: `best` is written only when training beats it.
        best_dice = dist.broadcast_object(held_out_dice(policy, sa2va, *val, batch=max(batch, 4)))
        log0(info, f"held-out Dice before training: {best_dice:.4f}")
        if info.is_main:
            append_jsonl(metrics_file, {"step": 0, "val_dice": best_dice})
    writer = tensorboard_writer(out / "tensorboard") if info.is_main else None
    log0(info, f"training {total_steps} steps: {len(dataset)} pairs, {info.world_size} rank(s), micro-batch "
               f"{batch} x accumulation {cfg.train.grad_accum} = {batch * cfg.train.grad_accum * info.world_size} "
               f"pairs per step, strategy {cfg.dist.strategy if info.enabled else 'single'}")
    wrapped.train()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with progress(info, "training", total_steps) as advance:
        advance(step)
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)
            # The micro-batches of this optimizer step: the data position follows from `step`.
            first = position * cfg.train.grad_accum
            micro = [order[(first + m) * batch : (first + m + 1) * batch] for m in range(cfg.train.grad_accum)]
            started = time.perf_counter()
            refreshed = refresh_pairs() if cfg.data.refresh_every and step % cfg.data.refresh_every == 0 else {}
            sums: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=info.device)  # read once per step: no host sync per micro-batch
            for m, indices in enumerate(micro):
                last_micro = m == len(micro) - 1
                with dist.no_grad_sync(wrapped, enabled=info.enabled and not last_micro):
                    with autocast(sa2va):
                        logits = wrapped(batch_features(indices))
                    refs = None if ref_logits is None else [ref_logits[image_of_pair[i]] for i in indices]
                    losses, parts = pair_losses(cfg, sa2va, logits, [chosen[i] for i in indices],
                                                [rejected[i] for i in indices], refs, sampling)
                    for key, value in parts.items():
                        sums[key] = sums.get(key, 0.0) + value
                    loss = losses.mean() / cfg.train.grad_accum
                    loss.backward()
                    loss_sum += loss.detach()

            # A non-finite loss or gradient on any rank skips the step on every rank.
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            flag = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm.to(info.device))).float().reshape(1)
            finite = float(dist.all_reduce_sum(flag)) == 0.0
            loss_value = float(loss_sum)
            if finite:
                optimizer.step()
                bad_in_a_row = 0
            else:
                skipped_total += 1
                bad_in_a_row += 1
                log0(info, f"[yellow]step {step + 1}: non-finite loss or gradient; step skipped "
                           f"({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise UserError(f"stopped at step {step + 1}: {bad_in_a_row} non-finite steps in a row "
                                    f"(train.max_bad_steps); lower optim.lr or check the data; checkpoints "
                                    f"in {out / 'checkpoints'} are intact")
            optimizer.zero_grad(set_to_none=True)
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1

            n_samples = batch * cfg.train.grad_accum
            keys = sorted(sums)
            values = torch.stack([torch.as_tensor(sums[k], device=info.device) for k in keys]).tolist() if keys else []
            record = {k: v / n_samples for k, v in zip(keys, values)}  # one host sync for every metric
            record["loss"] = loss_value
            record["grad_norm"] = float(grad_norm) if finite else float("nan")
            record = dist.all_reduce_mean(record, info.device)
            elapsed = time.perf_counter() - started
            record.update(step=step, epoch=epoch, lr=lr_used,
                          samples_per_s=n_samples * info.world_size / elapsed, skipped_steps=skipped_total,
                          **refreshed)
            if info.device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30

            if val is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                # Rank 0's number decides for all, so every rank takes the same save branch.
                record["val_dice"] = dist.broadcast_object(held_out_dice(policy, sa2va, *val, batch=max(batch, 4)))
                wrapped.train()
                if record["val_dice"] > best_dice:
                    best_dice = record["val_dice"]
                    save(step, best=True)
            if info.is_main and (step % cfg.train.log_every == 0 or step == total_steps):
                append_jsonl(metrics_file, record)
                if writer is not None:
                    for key, value in record.items():
                        if isinstance(value, float) and math.isfinite(value):
                            writer.add_scalar(f"train/{key}", value, step)
            advance(1, info=f"loss {record['loss']:.4f}")
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                save(step)
            if os.environ.get("SA2VA_DPO_KILL_AT_STEP") == str(step):  # fault injection for the tests
                os.kill(os.getpid(), signal.SIGKILL)

    # 6. Final checkpoint, held-out Dice, and the merged HF export.
    if val is not None:
        final_dice = dist.broadcast_object(held_out_dice(policy, sa2va, *val, batch=max(batch, 4)))
        log0(info, f"held-out Dice at the end: {final_dice:.4f} (best {max(best_dice, final_dice):.4f})")
        if final_dice > best_dice:
            best_dice = final_dice
            save(step, best=True)
    save(step)
    if writer is not None:
        writer.close()
    if info.is_main and cfg.model.random_weights:
        log0(info, "model.random_weights: no export (there are no real weights to merge into)")
    elif info.is_main:
        export_final(cfg, out, dtype=str(sa2va.dtype).removeprefix("torch."))
    dist.barrier()


def read_validation(cfg: Config) -> list[tuple]:
    """Held-out images (data.val_root; its holdout.json ids when present), read and checked
    before the model loads."""
    root = Path(cfg.data.val_root)
    ids = None
    if (root / "holdout.json").is_file():
        ids = json.loads((root / "holdout.json").read_text()).get("ids")
    entries = list_image_folder(root, need_masks=True, ids=ids)[: cfg.data.val_max_images]
    return [load_image_entry(e) for e in entries]


def export_final(cfg: Config, out: Path, dtype: str) -> None:
    """Load the base model fresh, apply the last checkpoint, merge LoRA, write OUTPUT/final."""
    last = ckpt.latest_checkpoint(out)
    base = load_sa2va(cfg.model.path, cfg.model.trust_remote_code, device="cpu", dtype=dtype)
    add_lora_and_freeze(base, cfg.lora, cfg.train_modules)
    ckpt.apply_trained(base.model, ckpt.load_trained(last), last)
    final = ckpt.export_hf(base, out / "final", overwrite=True)
    print(f"exported {final} (LoRA merged; loads with AutoModel.from_pretrained(..., trust_remote_code=True))")


def print_parameter_table(sa2va: Sa2VA) -> None:
    from rich.table import Table

    from sa2va.console import make_console, print_whole

    table = Table(title="parameters")
    for col in ("module", "trained", "frozen"):
        table.add_column(col, justify="right" if col != "module" else "left")
    total_t = total_f = 0
    for name, t, f in parameter_table(sa2va.model, sa2va.family):
        table.add_row(name, f"{t:,}", f"{f:,}")
        total_t, total_f = total_t + t, total_f + f
    table.add_row("total", f"{total_t:,}", f"{total_f:,}", style="bold")
    print_whole(make_console(), table)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop metric lines past the resumed step (they belong to the run that was cut off)."""
    if path.is_file():
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except ValueError:
                pass  # a line torn by a full disk
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


if __name__ == "__main__":
    run_cli(main)
