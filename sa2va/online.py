"""Online preference pairs: rejected masks remade from the current policy during training.

Offline pairs go stale: their rejected masks are the starting model's mistakes, and the policy
stops making them after a few steps. Every `data.refresh_every` optimizer steps the loop asks
the policy for its masks (at `data.refresh_thresholds`, plus `data.refresh_samples` draws from
its per-pixel Bernoulli) and gives each pair a fresh rejected mask under the curation gap rule
(1 - Dice(rejected, chosen) >= `data.refresh_min_gap`, sa2va.curation.gap). The chosen mask
(the truth) and the reference (the starting model) never change.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .losses import sample_masks


def mask_gap(rejected: Tensor, chosen: Tensor) -> float:
    """1 - Dice(rejected, chosen) as curation.gap computes it (XOR over the two sizes)."""
    r, c = rejected.bool(), chosen.bool().to(rejected.device)
    total = int(r.sum()) + int(c.sum())
    return 0.0 if total == 0 else int((r ^ c).sum()) / total


def refresh_rejected(
    logits: list[Tensor], image_of_pair: list[int], chosen: list[Tensor], rejected: list[Tensor],
    thresholds: list[float], samples: int, min_gap: float, generator: torch.Generator | None = None,
) -> tuple[list[Tensor], dict[str, float]]:
    """New rejected masks (1, H, W) for every pair from the policy's logits of its image.

    logits[u] is image u's policy logits at the loss resolution (1, H, W). Per pair, the
    candidates that pass the gap rule against its chosen mask are ranked by gap, smallest
    first (the policy's nearest miss, the most informative), and the pairs of one image take
    them in turn. A pair with no passing candidate keeps the rejected mask it had, which
    passed the rule when it was made. Returns the masks and stats to log: the mean gap of the
    rejected masks now in use, and the fraction of pairs that kept their old mask.
    """
    candidates: list[list[Tensor]] = []
    for z in logits:
        found = [(torch.sigmoid(z.float()) > t).float() for t in thresholds]
        if samples:
            found.extend(sample_masks(z[None], samples, generator)[:, 0])
        candidates.append(found)
    turn: dict[int, int] = {}
    out, gaps, kept = [], [], 0
    for j, u in enumerate(image_of_pair):
        scored = [(mask_gap(c, chosen[j]), k) for k, c in enumerate(candidates[u])]
        passing = sorted((g, k) for g, k in scored if g >= min_gap)
        if passing:
            n = turn.get(u, 0)
            turn[u] = n + 1
            g, k = passing[n % len(passing)]
            out.append(candidates[u][k].to(rejected[j].device, rejected[j].dtype))
            gaps.append(g)
        else:
            out.append(rejected[j])
            gaps.append(mask_gap(rejected[j], chosen[j]))
            kept += 1
    return out, {"refresh_gap_mean": float(np.mean(gaps)), "refresh_kept_old": kept / max(1, len(out))}


def pack_masks(masks: list[Tensor]) -> dict[str, Tensor]:
    """Binary masks as bits (for the checkpoint: the rejected masks in force at a step)."""
    flat = np.concatenate([m.bool().cpu().numpy().ravel() for m in masks])
    shapes = torch.tensor([list(m.shape) for m in masks], dtype=torch.int64)
    return {"bits": torch.from_numpy(np.packbits(flat)), "shapes": shapes}


def unpack_masks(packed: dict[str, Tensor]) -> list[Tensor]:
    shapes = [tuple(s) for s in packed["shapes"].tolist()]
    total = sum(int(np.prod(s)) for s in shapes)
    flat = np.unpackbits(packed["bits"].numpy(), count=total).astype(np.float32)
    out, start = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(torch.from_numpy(flat[start : start + n].reshape(s).copy()))
        start += n
    return out
