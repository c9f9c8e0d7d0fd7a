"""PNG plots of a training run for a person to look at (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from .fileio import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training(metrics_file: str | Path, out_dir: str | Path) -> list[Path]:
    """Loss parts, preference rewards/KL, and held-out Dice over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = {
        "losses.png": ("loss parts", [k for k in ("loss", "loss_mask_dpo", "loss_dice_dpo", "loss_bce", "loss_dice")]),
        "rewards.png": ("preference rewards (beta x mask log-likelihood ratio to the reference)",
                        ["reward_chosen", "reward_rejected", "reward_margin"]),
        "accuracy_kl.png": ("reward accuracy (margin > 0) and KL(policy || reference) per pixel",
                            ["reward_accuracy", "kl_ref"]),
        "dice.png": ("Dice of the prediction to the chosen / rejected mask; held-out Dice",
                     ["dice_chosen", "dice_rejected", "val_dice"]),
    }
    written = []
    for name, (title, keys) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key == "val_dice" else None, label=key)
                drawn = True
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            with atomic_path(out / name) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            written.append(out / name)
        plt.close(fig)
    return written
