"""Online mask DPO and mask GRPO: sampling, the policy gradient, the KL, the refresh, resume.

The unit tests use plain tensors; the resume tests run the real train_dpo.py on the tiny
checkpoint (kill -9 at step 3, --resume) and need every weight bit for bit.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_ok, trained_tensors

from sa2va.checkpoint import load_training_state
from sa2va.losses import bernoulli_logp, grpo_terms, mask_rewards, sample_masks
from sa2va.online import mask_gap, pack_masks, refresh_rejected, unpack_masks

TRAIN = [sys.executable, "train_dpo.py", "--cfg", "tiny"]


def vessel_mask(size: int = 16, seed: int = 0) -> torch.Tensor:
    """A few random horizontal and vertical lines, (1, 1, size, size)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), np.float32)
    for _ in range(3):
        m[rng.integers(size), :] = 1
        m[:, rng.integers(size)] = 1
    return torch.from_numpy(m)[None, None]


def test_sampled_masks_follow_the_logits_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 12, 12) * 2
    k = 4000
    masks = sample_masks(logits, k, torch.Generator().manual_seed(1))
    assert masks.shape == (k, 2, 1, 12, 12) and set(masks.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits).double()
    freq = masks.double().mean(0)
    z = (freq - p) / torch.sqrt(p * (1 - p) / k)
    assert float(z.abs().max()) < 4.5  # 288 pixels: a 4.5-sigma miss has probability ~2e-3 in all
    chi2 = float((z**2).sum())  # ~ chi-square with 288 degrees of freedom
    assert 288 - 5 * 24 < chi2 < 288 + 5 * 24
    # the draws come from the generator alone
    again = sample_masks(logits, 3, torch.Generator().manual_seed(1))
    assert torch.equal(again, masks[:3])
    assert not torch.equal(sample_masks(logits, 3, torch.Generator().manual_seed(2)), again)


@pytest.mark.parametrize("reward", ["dice", "cldice"])
def test_grpo_gradient_points_to_the_higher_reward_mask(reward):
    truth = vessel_mask()
    logits = torch.zeros_like(truth, requires_grad=True)  # p = 0.5 everywhere
    terms = grpo_terms(logits, logits.detach().clone(), truth, samples=512, reward=reward, kl=0.0,
                       generator=torch.Generator().manual_seed(0))
    terms["loss"].sum().backward()
    descent = -logits.grad
    sign = 2 * truth - 1  # up on the truth, down elsewhere raises the reward
    agree = float(((descent * sign) > 0).float().mean())  # per pixel: a noisy estimate from 512 samples
    cosine = float(torch.nn.functional.cosine_similarity(descent.flatten(), sign.flatten(), 0))
    assert agree > 0.7 and cosine > 0.4, (agree, cosine)
    # one step along it makes the truth more likely and the expected reward higher
    with torch.no_grad():
        stepped = logits + 4.0 * descent / descent.abs().max()
        assert bernoulli_logp(stepped, truth) > bernoulli_logp(logits, truth)
        gen = torch.Generator().manual_seed(3)
        before = mask_rewards(sample_masks(logits, 256, gen), truth, reward).mean()
        after = mask_rewards(sample_masks(stepped, 256, gen), truth, reward).mean()
    assert after > before + 0.05, (float(before), float(after))


def test_grpo_kl_is_zero_at_the_start_and_an_equal_group_has_no_advantage():
    truth = vessel_mask()
    logits = torch.randn_like(truth, requires_grad=True)
    terms = grpo_terms(logits, logits.detach().clone(), truth, samples=8, reward="dice", kl=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert float(terms["kl"].abs().max()) == 0.0
    # a certain policy samples one mask 8 times: equal rewards, zero advantage, zero gradient
    sure = (truth * 40 - 20).requires_grad_(True)
    terms = grpo_terms(sure, sure.detach().clone(), truth, samples=8, reward="dice", kl=0.0)
    assert float(terms["reward_std"]) == 0.0 and float(terms["reward_mean"]) == 1.0
    terms["loss"].sum().backward()
    assert float(sure.grad.abs().max()) == 0.0


def test_refresh_follows_the_policy_and_keeps_the_gap_rule():
    truth = [vessel_mask(seed=s)[0] for s in range(2)]
    chosen = [truth[0], truth[0], truth[1]]  # pairs 0 and 1 share image 0
    image_of_pair = [0, 0, 1]
    old = [torch.zeros_like(c) for c in chosen]
    torch.manual_seed(0)
    policy_a = [torch.randn_like(t) for t in truth]
    policy_b = [p + 1.5 for p in policy_a]  # the policy moved: it marks more pixels
    a, stats_a = refresh_rejected(policy_a, image_of_pair, chosen, old, [0.3, 0.5, 0.7], 0, 0.15)
    b, stats_b = refresh_rejected(policy_b, image_of_pair, chosen, a, [0.3, 0.5, 0.7], 0, 0.15)
    for masks in (a, b):
        assert all(mask_gap(r, c) >= 0.15 for r, c in zip(masks, chosen))
    assert all(not torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # two pairs of one image take different candidates
    assert stats_a["refresh_kept_old"] == 0.0 and stats_a["refresh_gap_mean"] >= 0.15
    # a policy that is already right has no mistake to offer: each pair keeps its old mask
    perfect = [t * 40 - 20 for t in truth]
    c, stats_c = refresh_rejected(perfect, image_of_pair, chosen, b, [0.3, 0.5, 0.7], 0, 0.15)
    assert stats_c["refresh_kept_old"] == 1.0 and all(torch.equal(x, y) for x, y in zip(b, c))
    # sampled candidates come from the generator
    d, _ = refresh_rejected(policy_a, image_of_pair, chosen, old, [], 4, 0.15, torch.Generator().manual_seed(0))
    assert all(mask_gap(r, k) >= 0.15 for r, k in zip(d, chosen))
    assert all(torch.equal(x, y) for x, y in zip(unpack_masks(pack_masks(d)), d))


def common(model, data, out, *extra):
    return [f"model.path={model}", f"data.root={data}", f"output_dir={out}", "train.micro_batch_size=1",
            "max_steps=5", "train.save_every=2", "train.grad_accum=1", "train.keep_checkpoints=5", *extra]


RECIPES = {
    # LoRA dropout stays on in both: the torch RNG and the sampling RNG must both resume.
    "online_dpo": ["data.refresh_every=2", "data.refresh_samples=2", "data.refresh_min_gap=0.15", "optim.lr=1e-3"],
    "grpo": ["loss.mask_dpo=0", "loss.grpo=1.0", "loss.samples=4", "optim.lr=1e-3"],
}
VOLATILE = ("samples_per_s", "peak_mem_gb")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_kill_and_resume_is_bit_identical(recipe, tiny_model, tiny_pairs, tmp_path):
    args = RECIPES[recipe]
    run_ok(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "straight", *args))
    killed = subprocess.run(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "cut", *args), cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "SA2VA_DPO_KILL_AT_STEP": "3"})
    assert killed.returncode != 0
    run_ok(TRAIN + common(tiny_model, tiny_pairs, tmp_path / "cut", *args) + ["--resume"])
    a = trained_tensors(tmp_path / "straight" / "checkpoints" / "step_0000005")
    b = trained_tensors(tmp_path / "cut" / "checkpoints" / "step_0000005")
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)

    def lines(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]

    straight, cut = lines("straight"), lines("cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5] and cut == straight
    assert abs(straight[0]["kl_ref"]) < 1e-6  # the policy starts as the reference
    assert (tmp_path / "cut" / "final" / "model.safetensors").is_file()

    if recipe == "grpo":
        assert {"grpo_reward_mean", "grpo_reward_std", "entropy", "sample_dice", "kl_ref"} <= set(straight[0])
        assert straight[0]["grpo_reward_std"] > 0
    else:
        # refreshed at steps 0, 2, 4 (thresholds + 2 samples: the sampling RNG resumes too), under the gap rule
        refreshed = [r for r in straight if "refresh_gap_mean" in r]
        assert [r["step"] for r in refreshed] == [1, 3, 5] and all(r["refresh_gap_mean"] >= 0.15 for r in refreshed)
        ckpts = tmp_path / "straight" / "checkpoints"
        early = unpack_masks(load_training_state(ckpts / "step_0000002")["rejected"])
        late = unpack_masks(load_training_state(ckpts / "step_0000005")["rejected"])
        assert any(not torch.equal(x, y) for x, y in zip(early, late))
        from sa2va.data import masks_to_tensor, read_pairs
        from sa2va.fileio import read_mask

        chosen = [masks_to_tensor([read_mask(e.chosen)])[0] for e in read_pairs(tiny_pairs)]
        assert all(mask_gap(r, c) >= 0.15 for masks in (early, late) for r, c in zip(masks, chosen))
