"""The source material's two figures, drawn off-screen (Agg) so nothing ever waits on a window."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_step_loss(losses: Sequence[float], path: Path, title: str = "") -> None:
    """Training loss per iteration, with a moving average to show the trend through the noise."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="per iteration")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = np.convolve(np.asarray(losses, dtype=float), np.ones(window) / window, mode="valid")
        ax.plot(range(window, len(losses) + 1), smooth, lw=1.5, label=f"moving average ({window})")
    ax.set(xlabel="iteration", ylabel="training loss", title=title or "Training loss per iteration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_epoch_curves(epochs: Sequence[dict[str, float]], path: Path, title: str = "",
                      unfreeze_epoch: int | None = None) -> None:
    """Accuracy and loss per epoch, train vs validation, with the unfreeze epoch marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [int(row["epoch"]) + 1 for row in epochs]
    for ax, metric in zip(axes, ("acc", "loss")):
        for split in ("train", "val"):
            ys = [row.get(f"{split}/{metric}", float("nan")) for row in epochs]
            ax.plot(x, ys, marker="o", ms=3, label="validation" if split == "val" else split)
        if unfreeze_epoch is not None and 0 < unfreeze_epoch < len(epochs):
            ax.axvline(unfreeze_epoch + 0.5, color="grey", ls="--", lw=1, label="backbone unfrozen")
        ax.set(xlabel="epoch", ylabel="accuracy" if metric == "acc" else "loss",
               title=("Accuracy" if metric == "acc" else "Loss") + " per epoch")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
