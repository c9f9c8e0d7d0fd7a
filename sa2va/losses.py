"""Mask losses: the seed's Dice-DPO, true mask DPO, mask GRPO, and the supervised BCE + Dice.

All take mask logits z (B, 1, H, W) and binary masks of the same shape (float 0/1):
chosen w (the ground truth), rejected l. One policy forward scores both masks; GRPO samples
its masks from the same forward's per-pixel Bernoulli.
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


REWARDS = ("dice", "cldice")


def sample_masks(logits: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
    """`samples` masks (K, B, 1, H, W) drawn pixel by pixel from Bernoulli(sigmoid(z)).

    One forward gives the whole policy: a mask is a draw of every pixel independently.
    The draws come from `generator` (the run's sampling RNG, saved in checkpoints).
    """
    prob = torch.sigmoid(logits.detach().float())
    u = torch.rand((samples, *prob.shape), generator=generator, device=prob.device)
    return (u < prob).float()


def mask_rewards(masks: Tensor, truth: Tensor, reward: str) -> Tensor:
    """Reward (K, B) of each sampled mask (K, B, 1, H, W) against the truth (B, 1, H, W):
    hard Dice (both empty = 1), or clDice as sa2va.metrics computes it (skeletons, on the CPU)."""
    if reward == "dice":
        inter = (masks * truth).flatten(2).sum(2)
        total = masks.flatten(2).sum(2) + truth.flatten(1).sum(1)
        return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    if reward == "cldice":
        from .metrics import image_metrics

        m = masks.bool().cpu().numpy()
        t = truth.bool().cpu().numpy()
        values = [[image_metrics(m[k, b, 0], t[b, 0])["cldice"] for b in range(m.shape[1])] for k in range(m.shape[0])]
        return torch.tensor(values, dtype=torch.float32, device=masks.device)
    raise ValueError(f"unknown reward {reward!r} (known: {', '.join(REWARDS)})")


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """Per-sample mean over pixels of the Bernoulli entropy (nats), (B,)."""
    z = logits.float()
    p = torch.sigmoid(z)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).flatten(1).mean(1)


def grpo_terms(logits: Tensor, ref_logits: Tensor, truth: Tensor, samples: int, reward: str, kl: float,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mask GRPO: a group of masks sampled from the policy, scored, advantages normalised.

    Per image: K masks m_k ~ pi = Bernoulli(sigmoid(z)); reward r_k = Dice or clDice to the
    truth; A_k = (r_k - mean r) / (std r + eps) within the image's group; loss =
    -mean_k A_k * log pi(m_k) / pixels + kl * KL(pi || pi_ref) per pixel (exact: both are
    per-pixel Bernoullis, the reference's logits cached). A group whose rewards are all equal
    has A = 0 and only the KL term pulls. Returns per-sample tensors (B,).
    """
    z = logits.float()
    masks = sample_masks(z, samples, generator)
    rewards = mask_rewards(masks, truth, reward)  # (K, B), no gradient
    spread = rewards.std(0, unbiased=False)
    advantage = (rewards - rewards.mean(0)) / (spread + 1e-6)
    # log pi(m_k) per pixel, (K, B): the sampled masks broadcast against the one forward.
    logp = (masks * F.logsigmoid(z) + (1 - masks) * F.logsigmoid(-z)).flatten(2).mean(2)
    policy_gradient = -(advantage * logp).mean(0)
    divergence = bernoulli_kl(z, ref_logits)
    return {
        "loss": policy_gradient + kl * divergence,
        "reward_mean": rewards.mean(0),
        "reward_std": spread,
        "sample_dice": rewards.mean(0) if reward == "dice" else mask_rewards(masks, truth, "dice").mean(0),
        "kl": divergence.detach(),
    }


def combined_loss(
    cfg: LossConfig, logits: Tensor, chosen: Tensor, rejected: Tensor, ref_logits: Tensor | None,
    generator: torch.Generator | None = None,
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
    grpo = None
    if cfg.grpo > 0:
        if ref_logits is None:
            raise ValueError("grpo needs reference logits")
        grpo = grpo_terms(logits, ref_logits, chosen, cfg.samples, cfg.reward, cfg.kl, generator)
        parts["loss_grpo"] = grpo["loss"]
        total = total + cfg.grpo * grpo["loss"]
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
        if grpo is not None:
            metrics["grpo_reward_mean"] = grpo["reward_mean"]
            metrics["grpo_reward_std"] = grpo["reward_std"]
            metrics["sample_dice"] = grpo["sample_dice"]
            metrics["entropy"] = bernoulli_entropy(logits)
        if ref_logits is not None:
            metrics["kl_ref"] = bernoulli_kl(logits, ref_logits)
        if ref_logits is not None and (cfg.mask_dpo > 0 or cfg.dice_dpo > 0):
            terms = mask_dpo_terms(logits, ref_logits, chosen, rejected, cfg.beta, cfg.mask_dpo_norm)
            metrics["reward_chosen"] = terms["reward_chosen"]
            metrics["reward_rejected"] = terms["reward_rejected"]
            metrics["reward_margin"] = terms["margin"]
            metrics["reward_accuracy"] = (terms["margin"] > 0).float()
    return total, metrics
