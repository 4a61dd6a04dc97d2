"""Every figure the tools write (loss curves, image grids, confusion matrices, residual statistics), drawn
off-screen (Agg) so nothing ever waits on a window."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import to_hex
from matplotlib.ticker import MaxNLocator


def _save(fig: plt.Figure, path: Path, title: str = "", dpi: int = 120) -> None:
    """Title (optional), lay out, write the PNG and free the figure (figures pile up in long sweeps otherwise)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


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
    _save(fig, path)


def epoch_ticks(ax: plt.Axes, epochs: Sequence[int]) -> None:
    """Whole-number epoch ticks, also for a run of one or two epochs (where ``MaxNLocator(integer=True)`` finds
    too few integers in view and falls back to ticks such as 0.95 ... 1.05)."""
    shown = sorted(set(epochs))
    if not shown:
        return
    if len(shown) <= 12:
        ax.set_xticks(shown)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(shown[0] - 0.5, shown[-1] + 0.5)


def mark_best(ax: plt.Axes, epoch: int, value: float, text: str, colour: str = "black") -> None:
    """A point at ``(epoch, value)`` with ``text`` beside it: where the best checkpoint was taken."""
    ax.plot([epoch], [value], marker="*", ms=12, color=colour, zorder=5, ls="none")
    ax.annotate(text, (epoch, value), xytext=(6, 6), textcoords="offset points", fontsize=8, color=colour)


def plot_epoch_curves(
    epochs: Sequence[dict[str, float]],
    path: Path,
    title: str = "",
    unfreeze_epoch: int | None = None,
    best_epoch: int | None = None,
    kept: str = "best",
) -> None:
    """Accuracy and loss per epoch, train vs validation, the unfreeze and the kept checkpoint's epoch marked.

    Args:
        epochs: ``history.json``'s rows, ``epoch`` numbered from 1.
        path: PNG to write.
        title: the figure's title.
        unfreeze_epoch: ``finetune.unfreeze_at_epoch``: epochs trained with the backbone frozen.
        best_epoch: the epoch the kept checkpoint was taken at (``summary.json``'s ``best_epoch``).
        kept: how that checkpoint was chosen, the mark's label: ``"best"`` (by validation) or ``"final"`` (a
            budget keeps its last step's).
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [int(row["epoch"]) for row in epochs]
    best = next((row for row in epochs if int(row["epoch"]) == best_epoch), None)
    for ax, metric in zip(axes, ("acc", "loss"), strict=True):
        for split in ("train", "val"):
            ys = [row.get(f"{split}/{metric}", float("nan")) for row in epochs]
            ax.plot(x, ys, marker="o", ms=3, label="validation" if split == "val" else split)
        if unfreeze_epoch is not None and 0 < unfreeze_epoch < len(epochs):
            ax.axvline(unfreeze_epoch + 0.5, color="grey", ls="--", lw=1, label="backbone unfrozen")
        if best is not None and f"val/{metric}" in best:
            value = best[f"val/{metric}"]
            shown = f"{100 * value:.2f}%" if metric == "acc" else f"{value:.3g}"
            mark_best(ax, int(best["epoch"]), value, f"{kept}: epoch {best_epoch}, {shown}")
        epoch_ticks(ax, x)
        ax.set(
            xlabel="epoch",
            ylabel="accuracy" if metric == "acc" else "loss",
            title=("Accuracy" if metric == "acc" else "Loss") + " per epoch",
        )
        ax.legend()
    _save(fig, path, title)


def image_grid(
    images: Sequence, titles: Sequence[str], truths: Sequence[str | None], path: Path, max_images: int = 64
) -> None:
    """A grid of images titled with their prediction; green when it matches the known true label, red when not.

    Args:
        images: file paths or ``(H, W, 3)`` uint8 arrays.
        titles: one caption per image (the prediction).
        truths: the true label per image, or ``None`` when unknown.
        path: PNG to write.
        max_images: at most this many are drawn.
    """
    from PIL import Image

    n = min(len(images), max_images)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    # strict=False: the grid may have more cells than images
    for ax, img, title, truth in zip(axes.flat, images[:n], titles[:n], truths[:n], strict=False):
        if isinstance(img, (str, Path)):
            with Image.open(img) as im:
                img = np.asarray(im.convert("RGB"))
        ax.imshow(img)
        colour = "black" if truth is None else ("green" if title.split()[0] == truth else "red")
        ax.set_title(title + ("" if truth is None else f"\ntrue: {truth}"), fontsize=7, color=colour)
    _save(fig, path, dpi=110)


def confusion_matrix_figure_object(matrix: np.ndarray, classes: Sequence[str], title: str = "") -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells, as a figure."""
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    """:func:`confusion_matrix_figure_object`, saved as a PNG."""
    _save(confusion_matrix_figure_object(matrix, classes, title), path)


def overlay_curves(
    curves: dict[str, tuple[Sequence[int], Sequence[float]]],
    ylabel: str,
    path: Path,
    best: dict[str, int | None] | None = None,
) -> None:
    """Several jobs' per-epoch curves on one axis, for a sweep report.

    Args:
        curves: per job (its legend label), the epochs (from 1) and the values at them.
        ylabel: what the values are.
        path: PNG to write.
        best: per job, the epoch of its best checkpoint, marked with a star and the epoch number.
    """
    fig, ax = plt.subplots(figsize=(9, 5))
    shown: list[int] = []
    for label, (xs, ys) in curves.items():
        if not ys:
            continue
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=label[:60])
        shown += list(xs)
        epoch = (best or {}).get(label)
        if epoch is not None and epoch in xs:
            mark_best(ax, epoch, ys[list(xs).index(epoch)], f"best {epoch}", to_hex(line.get_color()))
    ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ylabel} per epoch" + (" (star: best epoch)" if best else ""))
    epoch_ticks(ax, shown)
    ax.legend(fontsize=7)
    _save(fig, path)


def residual_figure(stats_by_weights: dict[str, list[Any]], path: Path, title: str = "") -> None:
    """Per block: ||F(x)||/||x||, cos(F(x), x) and the gradient ratio residual/shortcut, one line per weight set."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, stats in stats_by_weights.items():
        x = range(1, len(stats) + 1)
        axes[0].plot(x, [s.rel_norm for s in stats], marker="o", ms=3, label=label)
        axes[1].plot(x, [s.cos for s in stats], marker="o", ms=3, label=label)
        axes[2].plot(x, [s.grad_residual / max(s.grad_shortcut, 1e-12) for s in stats], marker="o", ms=3, label=label)
    ylabels = ("||F(x)|| / ||x||", "cos(F(x), x)", "||grad via F|| / ||grad via shortcut||")
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set(xlabel="residual block", ylabel=ylabel)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    _save(fig, path, title or "Inside the residual blocks")


def plain_vs_residual_figure(result: dict[str, dict[str, list[float]]], path: Path, title: str = "") -> None:
    """Training loss per step and mean gradient norm per block, plain vs residual."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for variant, data in result.items():
        axes[0].plot(range(1, len(data["loss"]) + 1), data["loss"], lw=1, label=variant)
        axes[1].plot(range(1, len(data["grad_norm"]) + 1), data["grad_norm"], marker="o", ms=3, label=variant)
    axes[0].set(xlabel="step", ylabel="training loss", title="Training loss")
    axes[1].set(
        xlabel="residual block (input side first)",
        ylabel="mean gradient norm of block parameters",
        title="Gradient reaching each block",
        yscale="log",
    )
    for ax in axes:
        ax.legend()
    _save(fig, path, title)
