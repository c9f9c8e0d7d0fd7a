"""Mask losses: the seed's Dice-DPO, true mask DPO, and the supervised BCE + Dice.

All take mask logits z (B, 1, H, W) and binary masks of the same shape (float 0/1):
chosen w (the ground truth), rejected l. One policy forward scores both masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LossConfig


def soft_dice(prob: Tensor, mask: Tensor, smooth: float = 0.0, eps: float = 1e-6) -> Tensor:
    """Per-sample soft Dice 2*sum(p*m) / (sum p + sum m), shape (B,)."""
    dims = tuple(range(1, prob.dim()))
    inter = (prob * mask).sum(dims)
    total = prob.sum(dims) + mask.sum(dims)
    return (2 * inter + smooth) / (total + smooth + eps)


def dice_dpo_loss(logits: Tensor, chosen: Tensor, rejected: Tensor, beta: float, eps: float = 1e-6) -> Tensor:
    """The seed's formula, kept to reproduce its table (it has no reference policy):
    -logsigmoid(beta * (log(Dice(p, w) + eps) - log(Dice(p, l) + eps))), per sample (B,)."""
    prob = torch.sigmoid(logits.float())
    margin = torch.log(soft_dice(prob, chosen) + eps) - torch.log(soft_dice(prob, rejected) + eps)
    return -F.logsigmoid(beta * margin)


def _normaliser(chosen: Tensor, rejected: Tensor, norm: str) -> Tensor:
    dims = tuple(range(1, chosen.dim()))
    if norm == "sum":
        return torch.ones(chosen.shape[0], device=chosen.device)
    if norm == "mean":
        return torch.full((chosen.shape[0],), float(chosen[0].numel()), device=chosen.device)
    if norm == "mean_disagree":
        return (chosen != rejected).float().sum(dims).clamp_min(1.0)
    raise ValueError(f"unknown mask_dpo normalisation {norm!r}")


def bernoulli_logp(logits: Tensor, mask: Tensor) -> Tensor:
    """Per-sample sum over pixels of log pi(m) = m log sigmoid(z) + (1 - m) log sigmoid(-z)."""
    dims = tuple(range(1, logits.dim()))
    z = logits.float()
    return (mask * F.logsigmoid(z) + (1 - mask) * F.logsigmoid(-z)).sum(dims)


def mask_dpo_terms(
    logits: Tensor, ref_logits: Tensor, chosen: Tensor, rejected: Tensor, beta: float, norm: str
) -> dict[str, Tensor]:
    """True DPO with each mask a per-pixel Bernoulli policy.

    log pi(w) - log pi(l) = sum over pixels where w != l of s_i * z_i (s = +1 where w = 1,
    -1 where w = 0): where the masks agree the terms cancel, so only the disagreement counts.
    The rewards are beta * (log pi - log pi_ref) of each mask, normalised the same way, so
    reward_chosen - reward_rejected is exactly the DPO logit.
    Returns per-sample tensors (B,): loss, reward_chosen, reward_rejected, margin.
    """
    z = logits.float()
    zref = ref_logits.float()
    denom = _normaliser(chosen, rejected, norm)
    reward_chosen = beta * (bernoulli_logp(z, chosen) - bernoulli_logp(zref, chosen)) / denom
    reward_rejected = beta * (bernoulli_logp(z, rejected) - bernoulli_logp(zref, rejected)) / denom
    # The logit from the cancelled form: cheaper and exact (no large sums subtracted).
    sign = chosen - rejected  # +1, -1 on disagreeing pixels, 0 elsewhere
    dims = tuple(range(1, z.dim()))
    logit = beta * (sign * (z - zref)).sum(dims) / denom
    return {
        "loss": -F.logsigmoid(logit),
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "margin": logit,
    }


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean sigmoid BCE, (B,)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return per_pixel.flatten(1).mean(1)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-sample 1 - soft Dice with the official recipe's smoothing (eps 1), (B,)."""
    return 1 - soft_dice(torch.sigmoid(logits.float()), target, smooth=smooth)


def bernoulli_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Per-sample mean over pixels of KL(pi || pi_ref) between per-pixel Bernoullis, (B,)."""
    z, zref = logits.float(), ref_logits.float()
    p = torch.sigmoid(z)
    kl = p * (F.logsigmoid(z) - F.logsigmoid(zref)) + (1 - p) * (F.logsigmoid(-z) - F.logsigmoid(-zref))
    return kl.flatten(1).mean(1)


def combined_loss(
    cfg: LossConfig, logits: Tensor, chosen: Tensor, rejected: Tensor, ref_logits: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the configured parts, and per-sample metrics to log (all (B,))."""
    parts: dict[str, Tensor] = {}
    total = torch.zeros(logits.shape[0], device=logits.device)
    if cfg.dice_dpo > 0:
        parts["loss_dice_dpo"] = dice_dpo_loss(logits, chosen, rejected, cfg.beta, cfg.dice_eps)
        total = total + cfg.dice_dpo * parts["loss_dice_dpo"]
    if cfg.mask_dpo > 0:
        if ref_logits is None:
            raise ValueError("mask_dpo needs reference logits")
        terms = mask_dpo_terms(logits, ref_logits, chosen, rejected, cfg.beta, cfg.mask_dpo_norm)
        parts["loss_mask_dpo"] = terms["loss"]
        total = total + cfg.mask_dpo * terms["loss"]
    if cfg.bce > 0:
        parts["loss_bce"] = bce_loss(logits, chosen)
        total = total + cfg.bce * parts["loss_bce"]
    if cfg.dice > 0:
        parts["loss_dice"] = dice_loss(logits, chosen, cfg.soft_dice_smooth)
        total = total + cfg.dice * parts["loss_dice"]

    # What TRL logs, in mask terms; computed whatever the loss, without gradients.
    with torch.no_grad():
        prob = torch.sigmoid(logits.float())
        hard = (prob > 0.5).float()
        metrics = {k: v.detach() for k, v in parts.items()}
        metrics["dice_chosen"] = soft_dice(hard, chosen, eps=1e-8)
        metrics["dice_rejected"] = soft_dice(hard, rejected, eps=1e-8)
        if ref_logits is not None:
            terms = mask_dpo_terms(logits, ref_logits, chosen, rejected, cfg.beta, cfg.mask_dpo_norm)
            metrics["reward_chosen"] = terms["reward_chosen"]
            metrics["reward_rejected"] = terms["reward_rejected"]
            metrics["reward_margin"] = terms["margin"]
            metrics["reward_accuracy"] = (terms["margin"] > 0).float()
            metrics["kl_ref"] = bernoulli_kl(logits, ref_logits)
    return total, metrics
