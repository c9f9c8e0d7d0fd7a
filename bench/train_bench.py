"""Benchmark of the suite's training step and evaluation paths on the real Sa2VA shapes (issue 7).

    # CPU smoke run (the tiny preset):
    python bench/train_bench.py --device cpu --plan "tiny=eval,naive,opt" --steps 2 --warmup 1
    # GPU: single-GPU variants on rank 0, then DDP / FSDP2 across all ranks:
    torchrun --nproc_per_node 2 bench/train_bench.py --device cuda \
        --plan "1b=eval,naive,opt,compile 4b=... 26b=...,ddp,fsdp" --out results.json

Each preset (sa2va.tiny.PRESETS: tiny, 1b, 4b, 26b) is built with random weights from its config
(AutoConfig + AutoModel.from_config, trust_remote_code, bf16 on CUDA) and driven through the
suite's own functions: prepare_images / encode_frozen (frozen ViT + SAM2 image encoder),
SegPolicy -> seg_logits (LLM decoder -> [SEG] -> text_hidden_fcs -> SAM2 heads),
train_dpo.pair_losses (losses.combined_loss) (the v8 recipe: dice_dpo 1.0 + dice 1.0, logits
upsampled to the image), distributed.wrap_policy / no_grad_sync, AdamW; and for evaluation
model.predict_probabilities (forward path) and evaluation.generate_mask (predict_forward).
One training step is what train_dpo.py's loop does for one optimizer step: grad_accum
micro-batches, each (features -> policy forward -> per-sample loss -> backward), then clip,
the finite check, AdamW.

Plan tokens (per preset; eager ones run first, then compiled, then multi-GPU):
  eval      forward path (predict_probabilities, batched) vs generate path (predict_forward,
            one image at a time), images/s and per-image mask Dice between the two
  naive     encoders recomputed every step, micro-batch 1, a separate reference forward per pair
  opt       encoders cached, micro-batch --micro-batch, cached reference logits (eager)
  nocache / mb1 / refsep / fullvocab / foreach / ckpt / nosync
            opt minus one optimisation (or plus activation checkpointing, or minus the suite
            loop's per-sample host syncs of the logged metrics)
  compile   opt with each LLM decoder layer torch.compile'd (train.compile=true)
  ddp       compile (or opt with --no-ddp-compile) under DDP on every rank
  fsdp      opt under FSDP2 (fully_shard per decoder layer + the policy) on every rank (eager)
  fsdpc     fsdp with the per-layer compile
  loop      what train_dpo.py's loop does since issue 17: opt with features, masks and reference
            logits on the GPU and one host sync per step (eager); fast = loop compiled (the default
            on CUDA); ddpfast / fsdpfast = fast under DDP / FSDP2 on every rank; fsdpstep =
            fsdpfast with dist.fsdp_gather=per_step (each layer gathered once per optimizer step)
  evalc     eval with the LLM and ViT blocks compiled (sa2va.batching.compile_for_inference);
  evalcs    and SAM2's Hiera blocks too
  NAME@MB or NAME@MBxACCUM sets a variant's micro-batch (and accumulation), e.g. compile@32x1
    python bench/train_bench.py --summarise-from run1.json run2.json --out docs/performance.json
merges the results of several runs into the summary of docs/performance.json.
FLOPs (sa2va.perf.count_flops) are counted once per preset; the ratio naive/optimised and the
DDP scaling are computed from the same run. Results go to --out (JSON, rewritten after every
variant) and a table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sa2va import distributed as dist  # noqa: E402
from sa2va import perf  # noqa: E402

WAIT_GROUP: list[Any] = [None]  # a gloo group for the long wait of rank 1 (set in main)
FAMILY: list[str | None] = [None]  # --family (set in main)
EAGER_VARIANTS = ("naive", "opt", "nocache", "mb1", "refsep", "fullvocab", "foreach", "nosync", "ckpt", "loop")
COMPILED_VARIANTS = ("compile", "fast")
MULTI_VARIANTS = ("ddp", "fsdp", "fsdpc", "ddpfast", "fsdpfast", "fsdpstep")
EVAL_VARIANTS = {"eval": (), "evalc": ("llm", "vit"), "evalcs": ("llm", "vit", "sam")}  # blocks compiled
PLAN_TOKENS = tuple(EVAL_VARIANTS) + EAGER_VARIANTS + COMPILED_VARIANTS + MULTI_VARIANTS
IMAGE_SIZE = 512  # one 448 px ViT tile (512 x 512 -> a 1 x 1 grid, no thumbnail)


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    cache: bool = True  # frozen encoder features computed once (train.cache_frozen)
    micro_batch: int = 8
    ref: str = "cached"  # cached: reference logits computed once; separate: a reference forward per pair
    full_vocab: bool = False  # run the LLM with its vocabulary head (logits for every position)
    fused: bool = True  # fused AdamW (optim.fused)
    sync_metrics: bool = True  # the loop's per-sample float(...) of every logged metric
    ckpt: bool = False  # activation checkpointing of the LLM (train.activation_checkpointing)
    compile: bool = False  # per-layer torch.compile (train.compile)
    strategy: str = "single"  # single | ddp | fsdp
    grad_accum: int | None = None  # None: --grad-accum
    on_device: bool = False  # train_dpo's loop since issue 17: features, masks, references on the GPU; one sync per step
    fsdp_gather: str = "per_use"  # dist.fsdp_gather: per_step keeps each layer gathered for the whole step


def make_variant(token: str, micro_batch: int, ddp_compile: bool, fsdp_compile: bool) -> Variant:
    """A plan token: NAME, or NAME@MB or NAME@MBxACCUM (micro-batch, accumulation)."""
    name, _, shape = token.partition("@")
    if shape:
        mb, _, accum = shape.partition("x")
        return replace(make_variant(name, int(mb), ddp_compile, fsdp_compile), name=token,
                       micro_batch=int(mb), grad_accum=int(accum) if accum else None)
    opt = Variant("opt", micro_batch=micro_batch)
    table = {
        "naive": Variant("naive", cache=False, micro_batch=1, ref="separate"),
        "opt": opt,
        "nocache": replace(opt, name="nocache", cache=False),
        "mb1": replace(opt, name="mb1", micro_batch=1),
        "refsep": replace(opt, name="refsep", ref="separate"),
        "fullvocab": replace(opt, name="fullvocab", full_vocab=True),
        "foreach": replace(opt, name="foreach", fused=False),
        "nosync": replace(opt, name="nosync", sync_metrics=False),
        "ckpt": replace(opt, name="ckpt", ckpt=True),
        "compile": replace(opt, name="compile", compile=True),
        # What train_dpo.py's loop does now (issue 17): on-device data, one host sync per step; eager / compiled.
        "loop": replace(opt, name="loop", on_device=True, sync_metrics=False),
        "fast": replace(opt, name="fast", on_device=True, sync_metrics=False, compile=True),
        "ddpfast": replace(opt, name="ddpfast", on_device=True, sync_metrics=False, compile=True, strategy="ddp"),
        "fsdpfast": replace(opt, name="fsdpfast", on_device=True, sync_metrics=False, compile=True, strategy="fsdp"),
        "fsdpstep": replace(opt, name="fsdpstep", on_device=True, sync_metrics=False, compile=True, strategy="fsdp",
                            fsdp_gather="per_step"),
        "ddp": replace(opt, name="ddp", compile=ddp_compile, strategy="ddp"),
        "fsdp": replace(opt, name="fsdp", compile=fsdp_compile, strategy="fsdp"),
        "fsdpc": replace(opt, name="fsdpc", compile=True, strategy="fsdp"),
    }
    return table[name]


def parse_plan(text: str) -> dict[str, list[str]]:
    """'1b=opt,compile 26b=opt,ddp' -> {'1b': ['opt', 'compile'], '26b': ['opt', 'ddp']}."""
    from sa2va.tiny import PRESETS

    plan: dict[str, list[str]] = {}
    for item in text.replace(";", " ").split():
        preset, sep, tokens = item.partition("=")
        if not sep or preset not in PRESETS:
            raise SystemExit(f"bad plan item {item!r}: expected PRESET=token,token with PRESET in {list(PRESETS)}")
        names = [t for t in tokens.split(",") if t]
        unknown = sorted({t.partition("@")[0] for t in names} - set(PLAN_TOKENS))
        if unknown:
            raise SystemExit(f"unknown plan tokens {unknown} (known: {', '.join(PLAN_TOKENS)})")
        plan[preset] = names
    return plan


# --------------------------------------------------------------------------- model without weights


def build_random_sa2va(preset: str, device: torch.device, dtype: torch.dtype, seed: int, workdir: Path):
    """A Sa2VA of the preset's shapes with random weights, through the suite's own loader:
    a checkpoint folder written without weights, then load_sa2va(random_weights=True)
    (AutoModel.from_config on the device, token ids and sizes read from the folder)."""
    from sa2va.model import load_sa2va
    from sa2va.tiny import write_tiny_checkpoint

    t0 = time.perf_counter()
    extra = {"family": FAMILY[0]} if FAMILY[0] else {}  # the LLM family of the 26B look-alike (issue 12)
    folder = write_tiny_checkpoint(workdir / f"{preset}-{os.getpid()}", seed=seed, preset=preset, weights=False,
                                   warmup=False, **extra)
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    sa2va = load_sa2va(folder, trust_remote_code=True, device=str(device),
                       dtype=str(dtype).removeprefix("torch."), random_weights=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    return {"folder_s": t1 - t0, "load_s": t2 - t1}, sa2va


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- data


def _sample(index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from sa2va.synth import make_sample

    image, mask, _ = make_sample(7, index, size)
    return image, mask


def make_images(n: int, size: int, workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if workers <= 1 or n <= 1:
        return [_sample(i, size) for i in range(n)]
    with ProcessPoolExecutor(max_workers=min(workers, n)) as pool:
        return list(pool.map(functools.partial(_sample, size=size), range(n)))


# --------------------------------------------------------------------------- the bench state


class Bench:
    """One preset: the model, the data, the caches, and the timed training step."""

    def __init__(self, sa2va, samples, args, info: dist.DistInfo):
        from scipy import ndimage

        from sa2va.config import load_config
        from sa2va.data import masks_to_tensor

        self.sa2va, self.args, self.info = sa2va, args, info
        self.device = sa2va.device
        self.cfg = load_config("v8", [f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum={args.grad_accum}"])
        self.images = [s[0] for s in samples]
        masks = [s[1] for s in samples]
        self.chosen = [masks_to_tensor([m])[0] for m in masks]  # loss.resolution=full: image size
        self.rejected = [masks_to_tensor([ndimage.binary_dilation(m, iterations=2)])[0] for m in masks]
        self.features: list[Any] | None = None
        self.ref_logits: list[torch.Tensor] | None = None
        self.policy = None
        self.timer = perf.PhaseTimer(self.device)
        self.hooks: list[Any] = []
        self.cursor = 0
        self.fsdp_wrapped = None

    # -- set-up, in the loop's order ---------------------------------------------------
    def add_lora(self) -> dict[str, float]:
        from sa2va.model import SegPolicy, add_lora_and_freeze

        torch.manual_seed(self.args.seed + 1)
        add_lora_and_freeze(self.sa2va, self.cfg.lora, self.cfg.train_modules)
        self.policy = SegPolicy(self.sa2va, self.cfg.model.question, self.cfg.model.answer)
        trained = sum(p.numel() for p in self.sa2va.model.parameters() if p.requires_grad)
        return {"trained_params": trained}

    def encode(self, indices: list[int]):
        from sa2va.model import autocast, encode_frozen, prepare_images

        with autocast(self.sa2va):
            return encode_frozen(self.sa2va, prepare_images(self.sa2va, [self.images[i] for i in indices]))

    def build_caches(self) -> dict[str, float]:
        """What train_dpo does before step 1: features of every image (kept on the CPU), then the
        reference logits of every pair (the starting policy, no gradients)."""
        from sa2va.model import autocast, freeze_unreachable

        n, chunk = len(self.images), max(self.args.micro_batch, 4)
        self.sync()
        t0 = time.perf_counter()
        feats = []
        for start in range(0, n, chunk):
            idx = list(range(start, min(n, start + chunk)))
            batch = self.encode(idx).to(torch.device("cpu"))
            feats.extend(batch.select([i]) for i in range(len(idx)))
        self.features = feats
        self.sync()
        t1 = time.perf_counter()
        self.policy.eval()
        refs = []
        with torch.no_grad():
            for start in range(0, n, chunk):
                idx = list(range(start, min(n, start + chunk)))
                with autocast(self.sa2va):
                    z = self.policy(self.cached(idx)).float().cpu()
                refs.extend(z[i] for i in range(len(idx)))
        self.ref_logits = refs
        self.sync()
        t2 = time.perf_counter()
        unreachable = freeze_unreachable(self.policy, self.cached([0]), self.sa2va)
        self.policy.train()
        return {"encode_s_per_image": (t1 - t0) / n, "reference_s_per_image": (t2 - t1) / n,
                "frozen_unreachable": len(unreachable)}

    def cached(self, indices: list[int], on_device: bool = False):
        from sa2va.model import FrozenFeatures

        feats = self.device_copies()["features"] if on_device else self.features
        return FrozenFeatures.cat([feats[i] for i in indices]).to(self.device)

    def device_copies(self) -> dict[str, list[Any]]:
        """Features, masks (uint8) and reference logits on the GPU, as train_dpo keeps them."""
        if getattr(self, "_device_copies", None) is None:
            self._device_copies = {
                "features": [f.to(self.device) for f in self.features],
                "chosen": [m.to(self.device, torch.uint8) for m in self.chosen],
                "rejected": [m.to(self.device, torch.uint8) for m in self.rejected],
                "refs": [z.to(self.device) for z in self.ref_logits]}
        return self._device_copies

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def install_hooks(self) -> None:
        model = self.sa2va.model
        lm = model.language_model
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self.hooks = perf.install_phase_hooks(
            self.timer, embedding=lm.get_input_embeddings(), decoder=decoder,
            vision=model.vision_model, sam_encoder=self.sa2va.sam2.image_encoder)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    # -- FLOPs -------------------------------------------------------------------------
    def count_flops(self, micro_batch: int) -> dict[str, Any]:
        """Counted FLOPs per sample of each component (eager; before any compile)."""
        from sa2va.model import autocast, prepare_images, prompt_ids

        sa2va, model = self.sa2va, self.sa2va.model
        inputs = prepare_images(sa2va, [self.images[0]])
        with torch.no_grad(), autocast(sa2va):
            _, vit, _ = perf.count_flops(lambda: model.extract_feature(inputs.vit_pixels.to(sa2va.device, sa2va.dtype)))
            _, sam, _ = perf.count_flops(lambda: sa2va.sam2.forward_image(inputs.sam_pixels.to(sa2va.device, sa2va.dtype)))
        idx = [i % len(self.images) for i in range(micro_batch)]
        feats = self.cached(idx)

        def train_micro():
            with autocast(sa2va):
                logits = self.policy(feats)
            loss = self.loss(logits, idx, [self.ref_logits[i] for i in idx], sums=None)
            loss.backward()

        _, train, _ = perf.count_flops(train_micro)
        self.policy.zero_grad(set_to_none=True)

        def reference():
            with torch.no_grad(), self.adapter_off(), autocast(sa2va):
                return self.policy(feats)

        _, ref, _ = perf.count_flops(reference)
        tokens = len(prompt_ids(sa2va, 1, self.cfg.model.question, self.cfg.model.answer))
        llm_cfg = model.config.llm_config
        lm = model.language_model
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        embeds = torch.randn(micro_batch, tokens, int(llm_cfg.hidden_size), device=sa2va.device, dtype=sa2va.dtype)
        ones = torch.ones(micro_batch, tokens, dtype=torch.long, device=sa2va.device)

        def llm_only():  # the decoder alone, fwd + bwd from one position (as from [SEG])
            with autocast(sa2va):
                hidden = decoder(inputs_embeds=embeds, attention_mask=ones, use_cache=False).last_hidden_state
            hidden[:, -4].float().sum().backward()

        _, llm, _ = perf.count_flops(llm_only)
        self.policy.zero_grad(set_to_none=True)
        closed = perf.llm_flops(llm_cfg, tokens, self.cfg.lora.r, self.cfg.lora.target_modules)
        vit_closed = perf.vit_flops(model.config.vision_config, 1, model.downsample_ratio,
                                    int(llm_cfg.hidden_size))
        return {
            "tokens_per_sample": tokens,
            "vit_fwd": vit,  # per 448 px tile = per sample here (ViT + mlp1)
            "sam_encoder_fwd": sam,
            "train_fwd_bwd": train / micro_batch,  # LLM + text_hidden_fcs + SAM2 heads + loss
            "llm_fwd_bwd": llm / micro_batch,  # the decoder alone
            "heads_and_loss_fwd_bwd": (train - llm) / micro_batch,
            "reference_fwd": ref / micro_batch,
            "closed_form_llm_fwd_bwd": closed["total"],
            "closed_form_llm_fwd": closed["forward"],
            "closed_form_vit_fwd": vit_closed,
            "llm_base_linear_params": closed["base_params"],
            "lora_params": closed["lora_params"],
        }

    # -- the step ----------------------------------------------------------------------
    @contextlib.contextmanager
    def adapter_off(self):
        lm = self.sa2va.model.language_model
        with lm.disable_adapter():
            yield

    def loss(self, logits: torch.Tensor, indices: list[int], refs: list[torch.Tensor],
             sums: dict[str, Any] | None, sync_metrics: bool = True, accum: int | None = None,
             on_device: bool = False) -> torch.Tensor:
        """train_dpo's loss: pair_losses (one upsample and loss call per mask size), metrics summed."""
        from train_dpo import pair_losses

        chosen, rejected = self.chosen, self.rejected
        if on_device:
            copies = self.device_copies()
            chosen, rejected = copies["chosen"], copies["rejected"]
        losses, parts = pair_losses(self.cfg, self.sa2va, logits, [chosen[i] for i in indices],
                                    [rejected[i] for i in indices], refs)
        if sums is not None:
            for key, value in parts.items():
                # The loop reads each metric once per step (float()); nosync keeps tensors.
                sums[key] = sums.get(key, 0.0) + (float(value) if sync_metrics else value.detach())
        return losses.mean() / (accum or self.cfg.train.grad_accum)

    def next_indices(self, micro_batch: int) -> list[int]:
        n = len(self.images)
        start = self.cursor * micro_batch + 3 * self.info.rank
        self.cursor += 1
        return [(start + j) % n for j in range(micro_batch)]

    def full_vocab_logits(self, features) -> torch.Tensor:
        """seg_logits with the LLM's vocabulary head run (the model's own forward), for the
        'no full-vocab logits' ablation: the same [SEG] state, plus logits at every position."""
        from sa2va.model import mlp1_trained, prompt_ids

        sa2va, model, device = self.sa2va, self.sa2va.model, self.device
        batch = len(features.tiles)
        q, a = self.cfg.model.question, self.cfg.model.answer
        sequences = [prompt_ids(sa2va, t, q, a) for t in features.tiles]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((batch, length), sa2va.tokenizer.pad_token_id or 0, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        lm = model.language_model
        embeds = lm.get_input_embeddings()(input_ids)
        vit = features.vit.to(device)
        if mlp1_trained(sa2va):
            vit = model.mlp1(vit)
        mask = input_ids == sa2va.img_context_token_id
        embeds = embeds.masked_scatter(mask[..., None], vit.reshape(-1, vit.shape[-1]).to(embeds.dtype))
        out = lm(inputs_embeds=embeds, attention_mask=attention, use_cache=False, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        seg_pos = (input_ids == sa2va.seg_token_id).int().argmax(dim=1)
        seg_embedding = model.text_hidden_fcs(hidden[torch.arange(batch, device=device), seg_pos])
        sam2 = sa2va.sam2
        res = sam2._forward_sam_heads(
            backbone_features=features.pix.to(device), point_inputs=None, mask_inputs=None,
            high_res_features=[h.to(device) for h in features.high_res],
            multimask_output=sam2._use_multimask(True, None), language_embd=seg_embedding[:, None])
        return res[3] + 0.0 * out.logits[:, -1:, :1].float().sum()  # keep the head's output alive

    def train_step(self, v: Variant, wrapped, optimizer, trainable) -> dict[str, float]:
        from sa2va.model import autocast

        timer, info, accum = self.timer, self.info, v.grad_accum or self.cfg.train.grad_accum
        multi = v.strategy != "single" and info.enabled
        sums: dict[str, Any] = {}
        loss_value: Any = 0.0
        timer.begin("data")
        for m in range(accum):
            timer.mark("data")
            indices = self.next_indices(v.micro_batch)
            feats = self.cached(indices, v.on_device) if v.cache else self.encode(indices)
            with dist.no_grad_sync(wrapped, enabled=multi and m < accum - 1):
                timer.mark("llm_fwd")
                with autocast(self.sa2va):
                    logits = self.full_vocab_logits(feats) if v.full_vocab else wrapped(feats)
                if v.ref == "separate":
                    timer.mark("reference")
                    with timer.pause(), torch.no_grad(), self.adapter_off(), autocast(self.sa2va):
                        ref = self.policy(feats).float()
                    refs = [ref[j] for j in range(len(indices))]
                else:
                    refs = [(self.device_copies()["refs"] if v.on_device else self.ref_logits)[i] for i in indices]
                timer.mark("loss")
                loss = self.loss(logits, indices, refs, sums, v.sync_metrics, accum, v.on_device)
                timer.mark("heads_bwd")
                loss.backward()
                loss_value = loss_value + (float(loss.detach()) if v.sync_metrics else loss.detach())
            timer.mark("data")
        timer.mark("optimizer")
        if v.on_device:  # the loop's order: the finite flag on the GPU, one sync, then the metrics in one read
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.optim.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            flag = (~torch.isfinite(torch.as_tensor(loss_value, device=self.device))
                    | ~torch.isfinite(grad_norm.to(self.device))).float().reshape(1)
            finite = float(dist.all_reduce_sum(flag) if multi else flag) == 0.0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if sums:
                torch.stack([torch.as_tensor(sums[k], device=self.device) for k in sorted(sums)]).tolist()
        else:
            loss_value = float(loss_value)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.optim.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            flag = torch.tensor([0.0 if math.isfinite(loss_value) and torch.isfinite(grad_norm) else 1.0],
                                device=self.device)
            finite = float(dist.all_reduce_sum(flag) if multi else flag) == 0.0
            optimizer.step()  # stepped even when not finite: random weights, and the time is what counts
            optimizer.zero_grad(set_to_none=True)
        out = timer.end()
        out["finite"] = float(finite)
        return out

    def run_variant(self, v: Variant, flops: dict[str, Any]) -> dict[str, Any]:
        args, info = self.args, self.info
        layers = self.policy.decoder_layers()
        for layer in layers:  # compile on or off (nn.Module.compile keeps the wrapper here)
            if v.compile:
                if getattr(layer, "_compiled_call_impl", None) is None:
                    layer.compile()
            else:
                layer._compiled_call_impl = None
        lm = self.sa2va.model.language_model
        if v.ckpt:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        strategy = v.strategy if info.enabled else "single"
        wrap_info = info if strategy != "single" else dist.DistInfo(0, 1, info.local_rank, info.device)
        if strategy == "fsdp" and self.fsdp_wrapped is not None:
            wrapped = self.fsdp_wrapped  # fully_shard is applied once; later FSDP variants reuse it
        else:
            wrapped = dist.wrap_policy(self.policy, strategy if strategy != "single" else "ddp", wrap_info, layers)
        if strategy == "fsdp":
            self.fsdp_wrapped = wrapped
            dist.set_fsdp_gather(wrapped, layers, v.fsdp_gather)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        fused = v.fused and self.device.type == "cuda"
        optimizer = torch.optim.AdamW(trainable, lr=self.cfg.optim.lr, weight_decay=self.cfg.optim.weight_decay,
                                      betas=tuple(self.cfg.optim.betas), fused=fused)
        wrapped.train()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            self.train_step(v, wrapped, optimizer, trainable)
        warmup_s = time.perf_counter() - t0
        records = [self.train_step(v, wrapped, optimizer, trainable) for _ in range(args.steps)]
        peak = perf.peak_memory_gib(self.device)
        optimizer_bench = self.optimizer_bench(trainable) if v.name == "opt" and self.device.type == "cuda" else None
        if v.ckpt:
            lm.gradient_checkpointing_disable()
        del optimizer
        reserved = torch.cuda.max_memory_reserved(self.device) / 2**30 if self.device.type == "cuda" else None
        if wrapped is not self.policy:
            del wrapped
        gc.collect()

        world = info.world_size if strategy != "single" else 1
        samples = v.micro_batch * (v.grad_accum or self.cfg.train.grad_accum)
        step_s = float(np.mean([r["total"] for r in records]))
        phases = sorted({k for r in records for k in r} - {"total", "finite"})
        phase_s = {k: float(np.mean([r.get(k, 0.0) for r in records])) for k in phases}
        per_gpu = samples / step_s
        useful = flops["train_fwd_bwd"]
        executed = useful
        if not v.cache:
            executed += flops["vit_fwd"] + flops["sam_encoder_fwd"]
        if v.ref == "separate":
            executed += flops["reference_fwd"]
        out = {
            "variant": asdict(v), "world_size": world, "samples_per_step_per_gpu": samples,
            "step_s": step_s, "step_s_min": float(np.min([r["total"] for r in records])),
            "step_s_max": float(np.max([r["total"] for r in records])),
            "samples_per_s_per_gpu": per_gpu, "samples_per_s_total": per_gpu * world,
            "phase_s_per_step": phase_s,
            "phase_ms_per_sample": {k: 1e3 * s / samples for k, s in phase_s.items()},
            "peak_mem_gib": peak, "peak_reserved_gib": reserved, "warmup_s": warmup_s, "steps": args.steps, "warmup_steps": args.warmup,
            "mfu_useful": perf.mfu(useful, per_gpu), "mfu_executed": perf.mfu(executed, per_gpu),
            "nonfinite_steps": int(sum(1 - r["finite"] for r in records)),
        }
        if optimizer_bench:
            out["optimizer_step_ms"] = optimizer_bench
        return out

    def after_failure(self) -> None:
        self.timer.active = False
        if self.policy is not None:
            self.policy.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def closed_form_flops(self, error: str) -> dict[str, Any]:
        """When counting fails: the closed forms (LLM only in the training step)."""
        from sa2va.model import prompt_ids

        model = self.sa2va.model
        llm_cfg = model.config.llm_config
        tokens = len(prompt_ids(self.sa2va, 1, self.cfg.model.question, self.cfg.model.answer))
        closed = perf.llm_flops(llm_cfg, tokens, self.cfg.lora.r, self.cfg.lora.target_modules)
        vit = perf.vit_flops(model.config.vision_config, 1, model.downsample_ratio, int(llm_cfg.hidden_size))
        return {"error": error, "source": "closed form", "tokens_per_sample": tokens, "vit_fwd": vit,
                "sam_encoder_fwd": 0.0, "train_fwd_bwd": closed["total"], "llm_fwd_bwd": closed["total"],
                "heads_and_loss_fwd_bwd": 0.0, "reference_fwd": closed["forward"],
                "closed_form_llm_fwd_bwd": closed["total"], "closed_form_llm_fwd": closed["forward"],
                "closed_form_vit_fwd": vit}

    def optimizer_bench(self, trainable: list[torch.Tensor]) -> dict[str, float]:
        """AdamW step time, fused vs foreach, on the same trained parameters (random grads)."""
        out = {}
        for p in trainable:
            p.grad = torch.randn_like(p) * 1e-3
        for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
            opt = torch.optim.AdamW(trainable, lr=1e-12, **kw)
            for _ in range(2):
                opt.step()
            self.sync()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                opt.step()
            stop.record()
            self.sync()
            out[name] = start.elapsed_time(stop) / 5
            del opt
        for p in trainable:
            p.grad = None
        return out

    # -- evaluation --------------------------------------------------------------------
    def bench_eval(self, n_forward: int, n_generate: int, batch: int, force: bool,
                   compiled: tuple[str, ...] = ()) -> dict[str, Any]:
        """Forward path (predict_probabilities, batched; `compiled` blocks torch.compile'd) vs
        predict_forward (one image at a time, eager)."""
        from sa2va.batching import compile_for_inference
        from sa2va.evaluation import generate_mask, mask_dice
        from sa2va.model import predict_probabilities

        sa2va, model = self.sa2va, self.sa2va.model
        question, answer = self.cfg.model.question, self.cfg.model.answer
        images = [self.images[i % len(self.images)] for i in range(max(n_forward, n_generate))]
        ids = sa2va.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)

        def generate(image):
            if force:
                from transformers import LogitsProcessorList

                bound = type(model).generate.__get__(model)
                model.generate = functools.partial(bound, logits_processor=LogitsProcessorList([ForceAnswer(ids)]))
            try:
                return generate_mask(sa2va, image, question)
            finally:
                if force:
                    del model.generate

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        blocks = compile_for_inference(sa2va, compiled) if compiled else []
        t0 = time.perf_counter()
        predict_probabilities(sa2va, images[:batch], batch_size=batch, question=question, answer=answer)  # warm-up
        warmup_s = time.perf_counter() - t0
        self.sync()
        t0 = time.perf_counter()
        probs = predict_probabilities(sa2va, images[:n_forward], batch_size=batch, question=question, answer=answer)
        self.sync()
        forward_s = time.perf_counter() - t0
        breakdown = self.eval_breakdown(images[:n_forward], batch, question, answer)
        serial_diff = self.serial_difference(images[:batch], probs[:batch], question, answer)
        if self.args.eval_profile:
            self.eval_profile(images[: 2 * batch], batch, question, answer, Path(self.args.eval_profile))
        for block in blocks:  # the generate path runs eager (decoding shapes would recompile)
            block._compiled_call_impl = None
        generate(images[0])
        self.sync()
        t0 = time.perf_counter()
        generated = [generate(im) for im in images[:n_generate]]
        self.sync()
        generate_s = time.perf_counter() - t0
        from sa2va.model import prepare_images

        t0 = time.perf_counter()
        for start in range(0, n_forward, batch):  # the CPU part both paths share
            prepare_images(sa2va, images[start : start + batch])
        preprocess_s = time.perf_counter() - t0
        agreement = [mask_dice(probs[i] > 0.5, generated[i][0]) for i in range(min(n_forward, n_generate))]
        fg_forward = [float((probs[i] > 0.5).mean()) for i in range(len(agreement))]
        fg_generate = [float(generated[i][0].mean()) for i in range(len(agreement))]
        # How decided the forward path's masks are: pixels whose probability is within 0.05 of the
        # threshold flip with rounding-sized changes (random weights leave many there)
        undecided = [float((np.abs(probs[i] - 0.5) < 0.05).mean()) for i in range(n_forward)]
        return {
            "forward_images_per_s": n_forward / forward_s, "forward_batch": batch, "forward_images": n_forward,
            "generate_images_per_s": n_generate / generate_s, "generate_images": n_generate,
            "speedup": (n_forward / forward_s) / (n_generate / generate_s),
            "preprocess_s_per_image": preprocess_s / n_forward,
            "agreement_dice": agreement, "agreement_dice_mean": float(np.mean(agreement)),
            "agreement_dice_min": float(np.min(agreement)),
            "foreground_fraction_forward": fg_forward, "foreground_fraction_generate": fg_generate,
            "undecided_fraction_forward": undecided,
            "generated_text": generated[0][1], "seg_tokens": [g[2] for g in generated],
            "forced_answer": force, "peak_mem_gib": perf.peak_memory_gib(self.device),
            "compiled": list(compiled), "compiled_blocks": len(blocks), "forward_warmup_s": warmup_s,
            "forward_ms_per_image": breakdown, "forward_vs_serial_max_abs": serial_diff,
        }

    def serial_difference(self, images: list, probs: list, question: str, answer: str) -> float:
        """Largest difference between predict_probabilities' maps (threaded preparation, pinned
        non-blocking copies, read-back a chunk late) and the same chunk done step by step with
        blocking copies: 0.0 when the pipelining changes nothing."""
        from sa2va.model import autocast, encode_frozen, prepare_images, seg_logits, upsample_logits

        sa2va = self.sa2va
        with torch.no_grad(), autocast(sa2va):
            low = seg_logits(sa2va, encode_frozen(sa2va, prepare_images(sa2va, images)), question, answer)
        serial = [torch.sigmoid(upsample_logits(low[i: i + 1], sa2va.sam_size, im.shape[:2]))[0, 0].float().cpu()
                  for i, im in enumerate(images)]
        return max(float(np.abs(a.numpy() - b).max()) for a, b in zip(serial, probs))

    def eval_breakdown(self, images: list, batch: int, question: str, answer: str) -> dict[str, float]:
        """GPU-timeline milliseconds per image of each phase of the forward path, from a second
        pass with module hooks: vit, sam_enc (SAM2 image encoder), llm_fwd (input embedding to
        the decoder's output), heads_fwd (text_hidden_fcs + SAM2 heads), post (from the mask
        decoder's return to the next chunk's ViT: upsampling, copies to the host, waiting for the
        next chunk), other (before the first ViT). Idle gaps count in the phase they fall in."""
        from sa2va.model import predict_probabilities

        self.install_hooks()
        timer = self.timer
        self.hooks.append(self.sa2va.sam2.sam_mask_decoder.register_forward_hook(
            lambda m, a, o: timer.mark("post")))
        try:
            timer.begin("other")
            predict_probabilities(self.sa2va, images, batch_size=batch, question=question, answer=answer)
            phases = timer.end()
        finally:
            timer.active = False
            self.remove_hooks()
        return {name: 1e3 * seconds / len(images) for name, seconds in phases.items()}

    def eval_profile(self, images: list, batch: int, question: str, answer: str, path: Path) -> None:
        """torch.profiler over the forward path on `images`: the CUDA kernels by total time."""
        from torch.profiler import ProfilerActivity, profile

        from sa2va.model import predict_probabilities

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            predict_probabilities(self.sa2va, images, batch_size=batch, question=question, answer=answer)
            self.sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{len(images)} images, batch {batch}\n{table}\n")


class ForceAnswer:
    """A logits processor that makes greedy decoding emit `ids` (the trained answer, 'It is
    [SEG].' + the stop word): random weights would never say [SEG]; the work per token is the
    same as a trained model's."""

    def __init__(self, ids: list[int]):
        self.ids, self.start = list(ids), None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        k = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[k]] = 0.0
        return forced


# --------------------------------------------------------------------------- driver


def run_preset(preset: str, tokens: list[str], samples, args, info: dist.DistInfo, results: dict,
               save) -> None:
    def base(t: str) -> str:
        return t.partition("@")[0]

    multi_tokens = [t for t in tokens if base(t) in MULTI_VARIANTS] if info.enabled else []
    single_tokens = [t for t in tokens if base(t) not in MULTI_VARIANTS]
    if not info.is_main and not multi_tokens:
        return
    entry = results.setdefault(preset, {"variants": {}})
    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.dtype == "float32":
        dtype = torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    log(info, f"== {preset}: building with random weights on {device} ({dtype})")
    t0 = time.perf_counter()
    entry["build_breakdown"], sa2va = build_random_sa2va(preset, device, dtype, args.seed, Path(args.workdir))
    sync()
    entry["build_s"] = time.perf_counter() - t0
    model = sa2va.model
    llm_cfg = model.config.llm_config
    entry["architecture"] = (getattr(llm_cfg, "architectures", None) or [type(model.language_model).__name__])[0]
    entry["params"] = {"total": count_params(model), "vision_model": count_params(model.vision_model),
                       "language_model": count_params(model.language_model),
                       "sam2_image_encoder": count_params(sa2va.sam2.image_encoder),
                       "sam2_mask_decoder": count_params(sa2va.sam2.sam_mask_decoder)}
    log(info, f"   built in {entry['build_s']:.1f} s ({entry['build_breakdown']}): "
              f"{entry['params']['total'] / 1e9:.2f} B parameters, {perf.peak_memory_gib(device) or 0:.1f} GiB")
    bench = Bench(sa2va, samples, args, info)

    for token in [t for t in single_tokens if t in EVAL_VARIANTS] if info.is_main else []:
        t0 = time.perf_counter()
        try:
            entry[token] = bench.bench_eval(args.eval_images, args.eval_generate, args.eval_batch, not args.no_force,
                                            EVAL_VARIANTS[token])
        except Exception as err:
            entry[f"{token}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log(info, f"   {token} failed: {entry[f'{token}_error']}")
            bench.after_failure()
            continue
        e = entry[token]
        log(info, f"   {token}: forward {e['forward_images_per_s']:.2f} img/s (compiled: {e['compiled'] or 'none'}, "
                  f"warm-up {e['forward_warmup_s']:.0f} s), generate "
                  f"{e['generate_images_per_s']:.2f} img/s ({e['speedup']:.1f}x), agreement Dice mean "
                  f"{e['agreement_dice_mean']:.4f} min {e['agreement_dice_min']:.4f} (forward pixels within 0.05 "
                  f"of the threshold: {np.mean(e['undecided_fraction_forward']):.3f}), CPU preprocessing "
                  f"{1e3 * e['preprocess_s_per_image']:.1f} ms/image; max |pipelined - serial| "
                  f"{e['forward_vs_serial_max_abs']:.2e}; forward ms/image by phase "
                  f"{ {k: round(v, 1) for k, v in e['forward_ms_per_image'].items()} } "
                  f"({time.perf_counter() - t0:.0f} s)")
        save()

    train_tokens = [t for t in tokens if t not in EVAL_VARIANTS]
    if not train_tokens:
        del bench, sa2va, model
        return
    entry.update(bench.add_lora())
    entry["caches"] = bench.build_caches()
    bench.install_hooks()
    if info.is_main:
        t0 = time.perf_counter()
        try:
            entry["flops"] = bench.count_flops(args.micro_batch)
        except Exception as err:
            entry["flops"] = bench.closed_form_flops(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            bench.after_failure()
        f = entry["flops"]
        log(info, f"   counted FLOPs/sample: train fwd+bwd {f['train_fwd_bwd'] / 1e12:.3f} T, of which LLM "
                  f"{f['llm_fwd_bwd'] / 1e12:.3f} T (closed form {f['closed_form_llm_fwd_bwd'] / 1e12:.3f} T), ViT {f['vit_fwd'] / 1e12:.2f} T, SAM2 enc "
                  f"{f['sam_encoder_fwd'] / 1e12:.2f} T, reference fwd {f['reference_fwd'] / 1e12:.2f} T "
                  f"({time.perf_counter() - t0:.0f} s)")
        save()
        # Eager variants first (plan order), then compiled ones: compiling is not undone cheaply.
        order = [t for t in single_tokens if base(t) in EAGER_VARIANTS]
        order += [t for t in single_tokens if base(t) in COMPILED_VARIANTS]
        for name in order:
            v = make_variant(name, args.micro_batch, args.ddp_compile, args.fsdp_compile)
            t0 = time.perf_counter()
            try:
                r = bench.run_variant(v, entry["flops"])
            except Exception as err:  # one failed variant must not cost the others
                r = {"variant": asdict(v), "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                bench.after_failure()
            entry["variants"][name] = r
            log_variant(info, preset, name, r, time.perf_counter() - t0)
            save()
    flops = entry.get("flops")
    if multi_tokens:
        torch.distributed.barrier(group=WAIT_GROUP[0])  # gloo, long timeout: rank 0 ran the single-GPU part
        flops = dist.broadcast_object(flops)
        # DDP before FSDP (fully_shard is applied once and stays); plan order within each.
        for name in [t for t in multi_tokens if base(t) == "ddp"] + [t for t in multi_tokens if base(t) != "ddp"]:
            v = make_variant(name, args.micro_batch, args.ddp_compile, args.fsdp_compile)
            t0 = time.perf_counter()
            try:
                r = bench.run_variant(v, flops)
            except Exception as err:  # raised on every rank alike (else the collective timeout ends the run)
                r = {"variant": asdict(v), "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                     "peak_mem_gib": perf.peak_memory_gib(device)}
                bench.after_failure()
            peaks = dist.all_gather_objects(r.get("peak_mem_gib"))
            r["peak_mem_gib_per_rank"] = peaks
            if info.is_main:
                entry["variants"][name] = r
                log_variant(info, preset, name, r, time.perf_counter() - t0)
                save()
            dist.barrier()
    bench.remove_hooks()
    del bench, sa2va, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log(info: dist.DistInfo, text: str) -> None:
    if info.is_main:
        print(text, flush=True)


def log_variant(info, preset: str, name: str, r: dict, wall: float) -> None:
    if "error" in r:
        log(info, f"   {name:9s} {r['error']}")
        return
    phases = " ".join(f"{k}={v:.1f}" for k, v in sorted(r["phase_ms_per_sample"].items(), key=lambda kv: -kv[1]))
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "-"
    log(info, f"   {name:9s} {r['samples_per_s_per_gpu']:8.2f} samples/s/GPU (x{r['world_size']}) "
              f"step {r['step_s'] * 1e3:.0f} ms, MFU {100 * r['mfu_useful']:.1f}% (executed "
              f"{100 * r['mfu_executed']:.1f}%), peak {mem}, warm-up {r['warmup_s']:.1f} s, wall {wall:.0f} s\n"
              f"             ms/sample: {phases}")


# --------------------------------------------------------------------------- summary


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The figures of docs/performance.json, keyed by shape."""
    out: dict[str, Any] = {"peak_bf16_flops": perf.H200_BF16_PEAK_FLOPS}
    naive_ratio, scaling, evals = {}, {}, {}
    for preset, entry in results.items():
        if not isinstance(entry, dict) or "variants" not in entry:
            continue
        key = f"sa2va-{preset}"
        variants = {k: v for k, v in entry["variants"].items() if "error" not in v}
        best_name = max((n for n in variants if variants[n]["world_size"] == 1),
                        key=lambda n: variants[n]["samples_per_s_per_gpu"], default=None)
        shape: dict[str, Any] = {"build_s": entry.get("build_s"), "params": entry.get("params")}
        if best_name:
            b = variants[best_name]
            shape.update({"best_variant": best_name, "train_samples_per_s_per_gpu": b["samples_per_s_per_gpu"],
                          "mfu": b["mfu_useful"], "peak_mem_gib": b["peak_mem_gib"],
                          "peak_mem_gb": b["peak_mem_gib"] * 2**30 / 1e9 if b["peak_mem_gib"] else None,
                          "step_ms_per_sample": b["phase_ms_per_sample"]})
        shape["variants"] = {n: {"samples_per_s_per_gpu": v["samples_per_s_per_gpu"],
                                 "samples_per_s_total": v["samples_per_s_total"], "world_size": v["world_size"],
                                 "micro_batch": v["variant"]["micro_batch"], "mfu": v["mfu_useful"],
                                 "mfu_executed": v["mfu_executed"], "peak_mem_gib": v["peak_mem_gib"],
                                 "step_ms_per_sample": v["phase_ms_per_sample"],
                                 **({"run": v["run"]} if "run" in v else {}),
                                 **({"peak_mem_gib_per_rank": v["peak_mem_gib_per_rank"]}
                                    if "peak_mem_gib_per_rank" in v else {})}
                             for n, v in variants.items()}
        errors = {k: v["error"] for k, v in entry["variants"].items() if "error" in v}
        if errors:
            shape["errors"] = errors
        if "flops" in entry:
            f = entry["flops"]
            shape["flops_per_sample"] = {k: f[k] for k in ("tokens_per_sample", "train_fwd_bwd", "llm_fwd_bwd", "vit_fwd",
                                                           "sam_encoder_fwd", "reference_fwd",
                                                           "closed_form_llm_fwd_bwd")}
        if "caches" in entry:
            shape["one_off_per_image_s"] = entry["caches"]
        out[key] = shape
        if "naive" in variants and best_name:
            naive_ratio[key] = {"naive": variants["naive"]["samples_per_s_per_gpu"], "optimised": best_name,
                                "optimised_samples_per_s": variants[best_name]["samples_per_s_per_gpu"],
                                "ratio": variants[best_name]["samples_per_s_per_gpu"]
                                / variants["naive"]["samples_per_s_per_gpu"]}
            same = [n for n in variants if variants[n]["world_size"] == 1
                    and variants[n].get("run") == variants["naive"].get("run")]
            best_same = max(same, key=lambda n: variants[n]["samples_per_s_per_gpu"])
            naive_ratio[key]["same_run_optimised"] = best_same
            naive_ratio[key]["same_run_ratio"] = (variants[best_same]["samples_per_s_per_gpu"]
                                                  / variants["naive"]["samples_per_s_per_gpu"])
            if "opt" in variants:
                naive_ratio[key]["ratio_eager_opt"] = (variants["opt"]["samples_per_s_per_gpu"]
                                                       / variants["naive"]["samples_per_s_per_gpu"])
        if "ddp" in variants:
            d = variants["ddp"]
            base = "compile" if d["variant"]["compile"] else "opt"
            if base in variants:
                scaling[key] = {"one_gpu": variants[base]["samples_per_s_per_gpu"],
                                "ddp_total": d["samples_per_s_total"], "world_size": d["world_size"],
                                "scaling": d["samples_per_s_total"] / variants[base]["samples_per_s_per_gpu"],
                                "peak_mem_gib_per_rank": d.get("peak_mem_gib_per_rank")}
        fsdp = {n: {"samples_per_s_total": v["samples_per_s_total"], "micro_batch": v["variant"]["micro_batch"],
                    "compile": v["variant"]["compile"], "peak_mem_gib_per_rank": v.get("peak_mem_gib_per_rank"),
                    "world_size": v["world_size"]}
                for n, v in variants.items() if v["variant"]["strategy"] == "fsdp"}
        if fsdp:
            shape["fsdp"] = fsdp
        found = {t: v for t, v in entry.items() if eval_base(t) and isinstance(v, dict)}
        if found:
            e = found.get("eval") or next(iter(found.values()))
            evals[key] = {k: e.get(k) for k in ("forward_images_per_s", "forward_batch", "generate_images_per_s",
                                                 "speedup", "agreement_dice_mean", "agreement_dice_min",
                                                 "preprocess_s_per_image", "forced_answer")}
            # Counted forward FLOPs per image: ViT + SAM2 encoder + the LLM and heads (no LoRA).
            f = entry.get("flops")
            per_image = f["vit_fwd"] + f["sam_encoder_fwd"] + f["reference_fwd"] if f else None
            if per_image and e.get("forward_images_per_s"):
                evals[key]["forward_flops_per_image"] = per_image
                evals[key]["forward_mfu"] = perf.mfu(per_image, e["forward_images_per_s"])
            evals[key]["forward_variants"] = {
                t: {"images_per_s": v["forward_images_per_s"], "compiled": v.get("compiled", []),
                    "compiled_blocks": v.get("compiled_blocks"),
                    "mfu": perf.mfu(per_image, v["forward_images_per_s"]) if per_image else None,
                    "warmup_s": v.get("forward_warmup_s"), "run": entry.get(f"{t}_run")}
                for t, v in found.items()}
        if "architecture" in entry:
            shape["architecture"] = entry["architecture"]
    out["naive_vs_optimised"] = naive_ratio
    out["ddp_2gpu_scaling"] = scaling
    out["eval_forward_vs_generate"] = evals
    return out


def print_table(results: dict[str, Any]) -> None:
    print("\n| shape | variant | GPUs | samples/s/GPU | step ms | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for preset, entry in results.items():
        if not isinstance(entry, dict):
            continue
        for name, r in entry.get("variants", {}).items():
            if "error" in r:
                print(f"| {preset} | {name} | - | {r['error']} | | | |")
                continue
            mem = r.get("peak_mem_gib_per_rank") or r["peak_mem_gib"]
            mems = mem if isinstance(mem, list) else [mem]
            mem = "/".join(f"{m:.1f}" if m is not None else "-" for m in mems)
            print(f"| {preset} | {name} | {r['world_size']} | {r['samples_per_s_per_gpu']:.2f} | "
                  f"{r['step_s'] * 1e3:.0f} | {100 * r['mfu_useful']:.1f}% | {mem} |")
        if "eval" in entry:
            e = entry["eval"]
            print(f"| {preset} | eval | 1 | forward {e['forward_images_per_s']:.2f} img/s vs generate "
                  f"{e['generate_images_per_s']:.2f} img/s ({e['speedup']:.1f}x); agreement Dice "
                  f"{e['agreement_dice_mean']:.3f} | | | |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="1b=eval,naive,opt,compile 4b=eval,naive,opt,compile 26b=eval,naive,opt,compile",
                   help="PRESET=token,token ... (tokens: " + ", ".join(PLAN_TOKENS) + ")")
    p.add_argument("--preset", default=None, help="shorthand: PRESET[,PRESET] with --variants")
    p.add_argument("--variants", default="eval,naive,opt", help="with --preset")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per variant")
    p.add_argument("--micro-batch", type=int, default=8, help="micro-batch of the optimised variants")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (v8: 4)")
    p.add_argument("--images", type=int, default=16, help="distinct synthetic 512 px images")
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--eval-generate", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-profile", default=None, metavar="TXT",
                   help="write a torch.profiler table of the forward path's CUDA kernels (2 batches) here")
    p.add_argument("--no-force", action="store_true", help="let predict_forward generate freely")
    p.add_argument("--no-ddp-compile", dest="ddp_compile", action="store_false")
    p.add_argument("--fsdp-compile", action="store_true")
    p.add_argument("--collective-timeout", type=int, default=300, help="seconds (NCCL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                   help="float32: weights and arithmetic in float32 on CUDA too (no bf16 autocast, no TF32), "
                        "for numerical checks such as the forward/generate agreement")
    p.add_argument("--family", default=None, help="LLM family of the preset (sa2va.tiny --family), e.g. internlm2")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--workdir", default=None, help="where the weightless checkpoint folders go")
    p.add_argument("--out", default=None, help="results JSON (full); SUMMARY next to it as *.summary.json")
    p.add_argument("--mission", default=None, metavar="MULTI_GPU_JSON",
                   help="with --summarise-from: experiments/multi_gpu.py's result of the mission's command at "
                        "the 26B shape on one GPU, for mission_command_vs_best")
    p.add_argument("--summarise-from", nargs="+", default=None, metavar="RESULTS",
                   help="merge results JSONs of several runs (later runs add variants) and write the "
                        "summary to --out; runs nothing")
    return p.parse_args(argv)


def headline_keys(summary: dict[str, Any], merged: dict[str, Any], mission_file: str | None) -> dict[str, Any]:
    """The keys issue 17 asks for at the top of docs/performance.json. Each measured one names the
    run it came from (its command is in docs/performance.md); one not measured is null, with why."""
    out: dict[str, Any] = {}
    why: dict[str, str] = {}
    source: dict[str, str] = {}
    big = summary.get("sa2va-26b", {})
    variants = big.get("variants", {})
    out["architecture"] = big.get("architecture")
    if out["architecture"] is None:
        why["architecture"] = "no 26B run recorded its LLM class"
    commands = {r["file"]: r.get("command", "see docs/performance.md") for r in merged["runs"]}
    forward = summary.get("eval_forward_vs_generate", {}).get("sa2va-26b", {}).get("forward_variants", {})
    # The fastest forward path measured (eager, or with its blocks compiled); labelled runs of a
    # variant (FILE=LABEL: another batch or image count) are shown but never the headline.
    forward = {t: v for t, v in forward.items() if "[" not in t}
    if forward:
        best = max(forward, key=lambda t: forward[t]["images_per_s"])
        out["eval_forward_images_per_s"] = forward[best]["images_per_s"]
        out["eval_forward_mfu"] = forward[best]["mfu"]
        out["eval_forward_variant"] = best
        source["eval_forward_images_per_s"] = source["eval_forward_mfu"] = (
            f"variant {best} (compiled: {', '.join(forward[best]['compiled']) or 'nothing'}): "
            f"{commands.get(forward[best]['run'])}")
        if set(forward[best]["compiled"]) - {"llm"} and forward[best].get("compiled_blocks") is None:
            out["eval_forward_note"] = (
                f"{best} asked for {', '.join(forward[best]['compiled'])}, but before the block lookup was fixed "
                "(after runs 4-5) only the LLM's decoder layers were found and compiled: the figure is the "
                "forward path with the LLM compiled, ViT and SAM2 eager")
    else:
        out["eval_forward_images_per_s"] = out["eval_forward_mfu"] = None
        why["eval_forward_images_per_s"] = why["eval_forward_mfu"] = "no evaluation run at the 26B shape"
    # FSDP2 against DDP at the same micro-batch (2 GPUs), the best of each.
    multi = {n: v for n, v in variants.items() if v["world_size"] > 1}
    ratios = {}
    for name, v in multi.items():
        twins = [d for n, d in multi.items() if n.startswith("ddp") and d["micro_batch"] == v["micro_batch"]]
        if name.startswith("fsdp") and twins:
            ratios[name] = v["samples_per_s_per_gpu"] / max(d["samples_per_s_per_gpu"] for d in twins)
    if ratios:
        best = max(ratios, key=ratios.get)
        out["fsdp_vs_ddp_per_gpu"] = ratios[best]
        source["fsdp_vs_ddp_per_gpu"] = (f"{best} over the best DDP variant at micro-batch {multi[best]['micro_batch']}: "
                                         f"{commands.get(multi[best].get('run'))}")
        if not any(n.startswith("fsdpstep") for n in ratios):
            why["fsdp_vs_ddp_per_gpu with dist.fsdp_gather=per_step"] = (
                "not measured (variant fsdpstep): needs 2 GPUs; only the 1-GPU machine kind was lent since it was written")
    else:
        out["fsdp_vs_ddp_per_gpu"] = None
        why["fsdp_vs_ddp_per_gpu"] = ("not measured: needs 2 GPUs running this 26B shape at the same micro-batch; "
                                      "only the 1-GPU machine kind was lent during issue 17's runs")
    for key in ("sa2va-26b", "sa2va-4b"):
        shape = summary.get(key, {})
        run = shape.get("variants", {}).get(shape.get("best_variant"), {}).get("run")
        source[f"{key}.train_samples_per_s_per_gpu"] = source[f"{key}.mfu"] = (
            f"variant {shape.get('best_variant')}: {commands.get(run)}")
    out["mission_command_vs_best"] = None
    if mission_file:
        mission = json.loads(Path(mission_file).read_text())
        run = mission.get("ddp1", {})
        mb = run.get("micro_batch_size")
        same = {n: v for n, v in variants.items() if v["world_size"] == 1 and v["micro_batch"] == mb}
        if run.get("samples_per_s_total") and same:
            best = max(same, key=lambda n: same[n]["samples_per_s_per_gpu"])
            out["mission_command_vs_best"] = run["samples_per_s_total"] / same[best]["samples_per_s_per_gpu"]
            out["mission_command"] = {"samples_per_s_per_gpu": run["samples_per_s_total"], "micro_batch_size": mb,
                                      "grad_accum": run.get("grad_accum"), "steps": run.get("steps"),
                                      "benchmark_variant": best,
                                      "benchmark_samples_per_s_per_gpu": same[best]["samples_per_s_per_gpu"],
                                      "command": mission.get("commands", {}).get("ddp1")}
            source["mission_command_vs_best"] = (f"{run.get('samples_per_s_total'):.2f} samples/s of "
                                                 f"`{out['mission_command']['command']}` (through python "
                                                 f"experiments/multi_gpu.py --gpus 1 --steps 60 --only ddp --preset "
                                                 f"{mission.get('preset')}) over variant {best}: "
                                                 f"{commands.get(same[best].get('run'))}")
        else:
            why["mission_command_vs_best"] = f"no benchmark variant at the mission run's micro-batch {mb}"
    else:
        why["mission_command_vs_best"] = "no mission run given (--mission)"
    out["headline_commands"] = source
    out["not_measured"] = why
    return out


def command_of(meta: dict[str, Any]) -> str:
    """The command line of a run, rebuilt from the arguments its results recorded."""
    a = meta["args"]
    defaults = vars(parse_args([]))
    parts = ["python3"]
    if meta.get("world_size", 1) > 1:
        parts += ["-m", "torch.distributed.run", "--nproc_per_node", str(meta["world_size"])]
    parts += ["bench/train_bench.py", "--device", a["device"], "--plan", f'"{a["plan"]}"']
    for key in ("steps", "warmup", "micro_batch", "grad_accum", "images", "eval_images", "eval_generate", "eval_batch",
                "collective_timeout", "image_size", "family"):
        if key in a and a[key] != defaults.get(key):
            parts += [f"--{key.replace('_', '-')}", str(a[key])]
    parts += ["--out", "OUT/" + Path(a["out"]).name] if a.get("out") else []
    return " ".join(parts)


def eval_base(key: str) -> bool:
    """Whether a results key is an evaluation variant, labelled (`evalcs[b16]`) or not."""
    return key.partition("[")[0] in EVAL_VARIANTS


def merge_results(files: list[str]) -> dict[str, Any]:
    """Results of several runs as one: per shape, later runs add variants (and missing parts).
    FILE=LABEL names that file's variants NAME[LABEL] (a run of the same variants under another
    setting, e.g. SA2VA_DPO_ATTENTION=eager, kept beside the default's rows)."""
    merged: dict[str, Any] = {"runs": []}
    for spec in files:
        name, _, label = spec.partition("=")
        run = json.loads(Path(name).read_text())
        merged["runs"].append({"file": Path(name).name, **({"label": label} if label else {}),
                               **{k: run["meta"].get(k) for k in
                                                           ("torch", "transformers", "device", "world_size", "plan")},
                               **({"command": command_of(run["meta"])} if "args" in run["meta"] else {})})
        for preset, entry in run.items():
            if preset == "meta" or not isinstance(entry, dict):
                continue
            target = merged.setdefault(preset, {"variants": {}})
            # Runs before issue 17 recorded no architecture: every preset was Qwen2-based then.
            arch = entry.get("architecture", "Qwen2ForCausalLM")
            if target.get("architecture", arch) != arch:  # another LLM family: the older rows are another model
                merged["replaced"] = merged.get("replaced", []) + [f"{preset}: {target['architecture']} rows of "
                                                                   f"{target.get('runs')} replaced by {arch}"]
                target = merged[preset] = {"variants": {}}
            target["architecture"] = arch
            target["runs"] = target.get("runs", []) + [Path(name).name]
            for key, value in entry.items():
                if key == "variants":
                    for vname, v in value.items():
                        key = f"{vname}[{label}]" if label else vname
                        if key in target["variants"]:  # the later run's row stands; say which it replaced
                            merged["replaced"] = merged.get("replaced", []) + [
                                f"{preset} {key}: {target['variants'][key]['run']} replaced by {Path(name).name}"]
                        target["variants"][key] = dict(v, run=Path(name).name)
                elif key in EVAL_VARIANTS or key == "flops" or key not in target:  # the newest evaluations, counts
                    if key in EVAL_VARIANTS and label:  # a labelled run's evaluation stands beside the default's
                        key = f"{key}[{label}]"
                    if eval_base(key) and key in target:
                        merged["replaced"] = merged.get("replaced", []) + [
                            f"{preset} {key}: {target.get(f'{key}_run')} replaced by {Path(name).name}"]
                    target[key] = value
                    if eval_base(key):
                        target[f"{key}_run"] = Path(name).name
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise_from:
        merged = merge_results(args.summarise_from)
        summary = summarise(merged)
        summary["runs"] = merged["runs"]
        summary.update(headline_keys(summary, merged, args.mission))
        if merged.get("replaced"):
            summary["replaced_rows"] = merged["replaced"]
        if args.out and Path(args.out).is_file():  # keys written by other tools (multi_gpu_x4) stay
            previous = json.loads(Path(args.out).read_text())
            summary.update({k: v for k, v in previous.items() if k not in summary and k.startswith("multi_gpu")})
        text = json.dumps(summary, indent=1, default=str)
        Path(args.out).write_text(text + "\n") if args.out else print(text)
        print_table(merged)
        return 0
    FAMILY[0] = args.family
    if args.dtype == "float32":  # float32 weights: sa2va.model.autocast adds no bf16; no TF32 either
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    plan = parse_plan(args.plan if args.preset is None else
                      " ".join(f"{p}={args.variants}" for p in args.preset.split(",")))
    # Images before any CUDA work (the worker processes fork).
    t0 = time.perf_counter()
    samples = make_images(args.images, args.image_size, workers=min(8, os.cpu_count() or 1))
    image_s = time.perf_counter() - t0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device == "cuda":
        # A short collective timeout, so that a desynchronised rank ends the run in minutes.
        import datetime

        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local),
                                             timeout=datetime.timedelta(seconds=args.collective_timeout))
    info = dist.init_distributed(args.device)
    if info.enabled:
        import datetime

        WAIT_GROUP[0] = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="sa2va_bench_")
    results: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
        else "cpu", "world_size": info.world_size, "plan": plan, "args": vars(args), "image_gen_s": image_s,
        "attention_env": os.environ.get("SA2VA_DPO_ATTENTION")}}
    try:
        import transformers

        results["meta"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    log(info, f"sa2va-dpo bench: torch {torch.__version__}, {results['meta']['device']} x{info.world_size}, plan {plan}")

    def save() -> None:
        if info.is_main and args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
            Path(args.out).with_suffix(".summary.json").write_text(json.dumps(summarise(results), indent=1,
                                                                              default=str))

    try:
        for preset, tokens in plan.items():
            try:
                run_preset(preset, tokens, samples, args, info, results, save)
            except Exception as err:
                results.setdefault(preset, {})["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                print(f"rank {info.rank}: {preset} failed: {results[preset]['error']}", flush=True)
                import traceback

                traceback.print_exc()
            torch._dynamo.reset()
            gc.collect()
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    finally:
        save()
        if info.is_main:
            print_table(results)
        dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
