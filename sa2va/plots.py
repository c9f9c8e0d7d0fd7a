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
        "losses.png": ("loss parts", [k for k in ("loss", "loss_mask_dpo", "loss_dice_dpo", "loss_grpo", "loss_bce", "loss_dice")]),
        "rewards.png": ("preference rewards (beta x mask log-likelihood ratio to the reference)",
                        ["reward_chosen", "reward_rejected", "reward_margin"]),
        "accuracy_kl.png": ("reward accuracy (margin > 0) and KL(policy || reference) per pixel",
                            ["reward_accuracy", "kl_ref"]),
        "dice.png": ("Dice of the prediction to the chosen / rejected mask; held-out Dice; online refresh gap",
                     ["dice_chosen", "dice_rejected", "val_dice", "refresh_gap_mean"]),
        "grpo.png": ("GRPO: reward mean and spread within groups, sampled-mask Dice, per-pixel entropy",
                     ["grpo_reward_mean", "grpo_reward_std", "sample_dice", "entropy"]),
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


def plot_baseline_curve(report_file: str | Path, out_png: str | Path) -> Path:
    """Held-out Dice and training loss over steps of `python -m sa2va.baseline` (its report's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(Path(report_file).read_text())
    steps = [c["step"] for c in report["curve"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [c["val_dice"] for c in report["curve"]], marker="o", label=f"held-out Dice ({report['n_val']} images)")
    ax.plot(steps, [c["loss"] for c in report["curve"]], marker=".", label="training loss (2 BCE + 0.5 Dice" + (" + IoU MSE" if "iou_weight" in report else "") + ")")
    ax.axvline(report["best_step"], color="grey", linestyle="--", label=f"kept: step {report['best_step']}")
    ax.set_xlabel("step")
    ax.set_title(f"baseline: stopped at step {report['stopped_at']} ({report['stopped_because']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
