"""Losses against values computed by hand (see the comments for the arithmetic)."""

import math

import pytest
import torch

from sa2va.config import LossConfig
from sa2va.losses import (
    bce_loss,
    bernoulli_logp,
    combined_loss,
    dice_dpo_loss,
    dice_loss,
    mask_dpo_terms,
)

# One 2x2 image. Chosen and rejected disagree at (0,1) (w=0, l=1) and (1,0) (w=1, l=0).
W = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
L = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
Z = torch.tensor([[[[0.5, 2.0], [-1.0, 3.0]]]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    "norm, expected",
    [
        # sum_{w != l} s_i z_i = -1 * 2.0 + 1 * (-1.0) = -3; beta 0.5 -> logit -1.5
        ("sum", softplus(1.5)),
        # divided by all 4 pixels -> logit -0.375
        ("mean", softplus(0.375)),
        # divided by the 2 disagreeing pixels -> logit -0.75
        ("mean_disagree", softplus(0.75)),
    ],
)
def test_mask_dpo_hand_values(norm, expected):
    terms = mask_dpo_terms(Z, torch.zeros_like(Z), W, L, beta=0.5, norm=norm)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_mask_dpo_is_log2_when_policy_equals_reference():
    z = torch.randn(3, 1, 8, 8)
    w = (torch.rand(3, 1, 8, 8) > 0.5).float()
    l = (torch.rand(3, 1, 8, 8) > 0.5).float()
    for norm in ("sum", "mean", "mean_disagree"):
        terms = mask_dpo_terms(z, z.clone(), w, l, beta=0.2, norm=norm)
        assert torch.allclose(terms["loss"], torch.full((3,), math.log(2.0)))
        assert torch.allclose(terms["margin"], torch.zeros(3))


def test_margin_equals_difference_of_full_bernoulli_likelihoods():
    # The cancelled form must equal log pi(w) - log pi(l) computed over every pixel.
    z = torch.randn(2, 1, 6, 6)
    zref = torch.randn(2, 1, 6, 6)
    w = (torch.rand(2, 1, 6, 6) > 0.5).float()
    l = (torch.rand(2, 1, 6, 6) > 0.5).float()
    terms = mask_dpo_terms(z, zref, w, l, beta=1.0, norm="sum")
    full = (bernoulli_logp(z, w) - bernoulli_logp(zref, w)) - (bernoulli_logp(z, l) - bernoulli_logp(zref, l))
    assert torch.allclose(terms["margin"], full, atol=1e-4)
    assert torch.allclose(terms["reward_chosen"] - terms["reward_rejected"], terms["margin"], atol=1e-4)


def test_mask_dpo_gradient_only_on_disagreeing_pixels_and_with_the_right_sign():
    z = Z.clone().requires_grad_(True)
    mask_dpo_terms(z, torch.zeros_like(Z), W, L, beta=0.5, norm="sum")["loss"].sum().backward()
    g = z.grad[0, 0]
    assert g[0, 0] == 0 and g[1, 1] == 0  # masks agree there: no signal
    assert g[1, 0] < 0  # chosen-only pixel: descending the loss raises its logit
    assert g[0, 1] > 0  # rejected-only pixel: descending lowers it


def test_dice_dpo_hand_values():
    w = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    l = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    # p = 0.5 everywhere: Dice(p, w) = Dice(p, l) = 2*1.5 / (2 + 3) = 0.6 -> margin 0 -> log 2
    assert dice_dpo_loss(torch.zeros(1, 1, 2, 2), w, l, beta=0.2).item() == pytest.approx(math.log(2), rel=1e-5)
    # p ~= w: Dice(p, w) = 1, Dice(p, l) = 2*2/6 = 2/3 -> margin log(1.5) -> softplus(-0.2 log 1.5)
    z = (w * 2 - 1) * 30.0
    expected = softplus(-0.2 * math.log(1.5))
    assert dice_dpo_loss(z, w, l, beta=0.2).item() == pytest.approx(expected, rel=1e-4)


def test_supervised_parts_hand_values():
    w = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    z = torch.zeros(1, 1, 2, 2)
    assert bce_loss(z, w).item() == pytest.approx(math.log(2), rel=1e-6)
    # 1 - (2 * 1.5 + 1) / (2 + 3 + 1) = 1/3
    assert dice_loss(z, w, smooth=1.0).item() == pytest.approx(1 / 3, rel=1e-5)


def test_combined_weights_and_logged_metrics():
    cfg = LossConfig(dice_dpo=1.0, dice=1.0, bce=2.0, mask_dpo=0.5, beta=0.5, mask_dpo_norm="sum")
    total, metrics = combined_loss(cfg, Z, W, L, torch.zeros_like(Z))
    expected = (dice_dpo_loss(Z, W, L, 0.5) + dice_loss(Z, W) + 2.0 * bce_loss(Z, W)
                + 0.5 * mask_dpo_terms(Z, torch.zeros_like(Z), W, L, 0.5, "sum")["loss"])
    assert torch.allclose(total, expected)
    for key in ("loss_dice_dpo", "loss_mask_dpo", "loss_bce", "loss_dice", "dice_chosen", "dice_rejected",
                "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "kl_ref"):
        assert key in metrics, key
    # Z > 0 at (0,0), (0,1), (1,1): hard mask vs W: tp 2, fp 1, fn 1 -> Dice 4/6
    assert metrics["dice_chosen"].item() == pytest.approx(4 / 6, rel=1e-5)
    assert metrics["reward_accuracy"].item() == 0.0  # margin -1.5 < 0


def test_parts_with_zero_weight_are_not_computed():
    cfg = LossConfig(dice=1.0)
    _, metrics = combined_loss(cfg, Z, W, L, None)
    assert "loss_dice_dpo" not in metrics and "reward_margin" not in metrics
    with pytest.raises(ValueError):
        combined_loss(LossConfig(mask_dpo=1.0), Z, W, L, None)
