"""``python -m transfer.lr_find [any transfer.run overrides]``: Lightning's learning-rate range test.

Runs ``Tuner.lr_find`` on exactly what ``transfer.run`` would train with the same overrides (model, data,
optimizer, staged fine-tuning), writes the loss-vs-lr plot and prints the suggested ``optimizer.lr``. The range
test covers the first phase of the run: the head alone when the backbone starts frozen, the whole network
(every layer-decay group scaled alike) with ``finetune.unfreeze_at_epoch=0``. The suggestion is the steepest
descent of the smoothed loss, as Lightning (and fastai's ``lr_find``) computes it: a starting point to try, not
the answer; one-cycle schedules usually take a peak 3-10x above it.

Lightning records an exponential moving average of the loss, bias-corrected with ``1 - beta**(global_step + 1)``;
its callback reads ``global_step`` after the optimizer step, so the correction is one step ahead and the first
points come out low (the first at about half the loss: 1.2 where a fresh 10-class head starts at ln 10 = 2.3).
:func:`debiased` corrects the curve before the suggestion, the plot and ``lr_find.json`` use it.

Where Lightning gives no suggestion (it needs two finite points after skipping the first 10 and the last one),
:func:`no_suggestion_reason` says why: too few steps asked for, the data ran out first, or the loss diverged.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.tuner.lr_finder import _LRCallback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from transfer.core.errors import ConfigError
from transfer.training.train import build, build_trainer, finetune_callbacks

# The smoothing factor of Lightning's range-test callback (not an argument of Tuner.lr_find).
BETA: float = inspect.signature(_LRCallback).parameters["beta"].default
# Lightning's suggestion skips this many points at the start and at the end (LRFinder.suggestion's defaults).
SKIP_BEGIN, SKIP_END = 10, 1


def debiased(losses: Sequence[float], start_step: int = 0, beta: float = BETA) -> list[float]:
    """Lightning's smoothed range-test losses with the moving average's bias corrected for the points it holds.

    Lightning divides its running average after ``i + 1`` recorded steps by ``1 - beta**(start_step + i + 2)``
    (``global_step`` has already counted the step); the average of ``i + 1`` values needs ``1 - beta**(i + 1)``.

    Args:
        losses: ``LRFinder.results["loss"]`` (NaN where a step returned no loss).
        start_step: ``trainer.global_step`` when the range test began (0 for a fresh trainer).
        beta: the smoothing factor.

    Returns:
        The corrected curve: its first point is the first batch's loss.
    """
    out, updates = [], 0
    for loss in losses:
        if math.isnan(loss):  # Lightning records NaN without updating its average
            out.append(loss)
            continue
        updates += 1
        out.append(loss * (1 - beta ** (start_step + updates + 1)) / (1 - beta**updates))
    return out


def no_suggestion_reason(losses: Sequence[float], num_training: int) -> str:
    """Why Lightning's ``suggestion()`` gave none, from the curve it had.

    Args:
        losses: the range test's losses, one per step it ran.
        num_training: the steps asked for (``lr_find.num_training``).

    Returns:
        One sentence: what happened and which setting changes it.
    """
    usable = [x for x in losses[SKIP_BEGIN : len(losses) - SKIP_END] if math.isfinite(x)]
    base = (
        f"Lightning needs 2 finite loss points after skipping the first {SKIP_BEGIN} and the last {SKIP_END} "
        f"(at least {SKIP_BEGIN + SKIP_END + 2} steps); the range test recorded {len(losses)} of the "
        f"{num_training} asked for, {len(usable)} usable"
    )
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) < len(losses):
        return f"{base}: the loss was not finite (NaN/inf); lower lr_find.max_lr or check the data"
    if len(losses) < num_training:
        if finite and len(finite) > 1 and finite[-1] > 4 * min(finite):
            return f"{base}: it stopped early because the loss diverged (4x its best); lower lr_find.min_lr"
        return (
            f"{base}: the training data ran out first (trainer.max_epochs x batches per epoch is less than "
            f"lr_find.num_training); raise trainer.max_epochs or use more data"
        )
    return f"{base}: raise lr_find.num_training (100 is a common choice)"


def lr_range_test(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run the range test and write ``lr_find.png`` and ``lr_find.json`` into ``out_dir``.

    Args:
        cfg: the composed ``transfer.run`` config plus the ``lr_find`` group (min_lr, max_lr, num_training).
        out_dir: where the plot and the numbers go.

    Returns:
        ``{"suggested_lr": ..., "configured_lr": ..., "no_suggestion": ...}``: the last is ``None``, or why
        there is no suggestion (:func:`no_suggestion_reason`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    # The range test replaces the run's scheduler with its own exponential one; a per-step schedule would fight it.
    merged = OmegaConf.merge(cfg, {"scheduler": None})
    assert isinstance(merged, DictConfig)  # a DictConfig merged with a mapping stays one
    cfg = merged
    datamodule, module = build(cfg, cache_features=False)
    trainer = build_trainer(cfg, out_dir, finetune_callbacks(cfg))
    args = cfg.lr_find
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        num_training=args.num_training,
        update_attr=False,
    )
    if finder is None:
        raise ConfigError("The lr range test did not run (Lightning returned no result); check trainer.fast_dev_run.")
    finder.results["loss"] = debiased(finder.results["loss"])  # the trainer is fresh: global_step 0 at the start
    suggestion = finder.suggestion(skip_begin=SKIP_BEGIN, skip_end=SKIP_END)
    figure = finder.plot(suggest=suggestion is not None)
    if isinstance(figure, Figure):  # finder.plot draws a new Figure when given no axes
        figure.savefig(out_dir / "lr_find.png", dpi=120)
    result: dict[str, Any] = {
        "suggested_lr": suggestion,
        "configured_lr": float(cfg.optimizer.lr),
        "no_suggestion": None
        if suggestion is not None
        else no_suggestion_reason(finder.results["loss"], args.num_training),
    }
    (out_dir / "lr_find.json").write_text(
        json.dumps({**result, "lr": finder.results["lr"], "loss": finder.results["loss"]}, indent=1)
    )
    return result
