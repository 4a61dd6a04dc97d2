"""Divergence guard: stop a run whose loss is no longer finite (or explodes) before it trains on garbage.

A NaN or infinite loss poisons the weights at the next optimizer step, and every later epoch then trains and
checkpoints garbage. :class:`DivergenceGuard` checks the loss before each backward pass, so the step that would
apply it never happens, the checkpoints already written (the last finished epoch's ``last.ckpt``, the best
one) stay the last good ones, and the run ends with a :class:`~transfer.core.errors.DivergenceError` (exit status 2)
naming the epoch, the step and the learning rates.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from torch import Tensor

from transfer.core.errors import DivergenceError


class DivergenceGuard(L.Callback):
    """Stop training at the first non-finite loss, or at a loss above ``max_loss``.

    The check reads the loss on the host once per step (one device sync on a GPU, small next to a step).

    Args:
        max_loss: also stop when the training loss exceeds this (``None``: only non-finite losses stop).
    """

    def __init__(self, max_loss: float | None = None) -> None:
        if max_loss is not None and not max_loss > 0:
            raise ValueError(f"max_loss must be positive or None, got {max_loss}")
        self.max_loss = max_loss

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value) and (self.max_loss is None or value <= self.max_loss):
            return
        raise DivergenceError(self.message(trainer, value))

    def message(self, trainer: L.Trainer, value: float) -> str:
        """What diverged, where, which checkpoint is the last good one, and what to change."""
        what = (
            "not finite" if not math.isfinite(value) else f"above callbacks.divergence_guard.max_loss={self.max_loss}"
        )
        rates = (
            ", ".join(
                f"{group.get('name', i)} {group['lr']:.3g}"
                for opt in trainer.optimizers
                for i, group in enumerate(opt.param_groups)
            )
            or "n/a"
        )
        last = _last_good(trainer)
        kept = (
            f"The last good checkpoint, {last}, is kept (resume=<it> continues from there)"
            if last
            else "No epoch finished, so there is no checkpoint to keep"
        )
        return (
            f"Training diverged: the loss was {value:g} ({what}) at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1} of "
            f"the epoch), with learning rates {rates}; the run was stopped before that step updated the "
            f"weights. {kept}. Lower optimizer.lr, set trainer.gradient_clip_val=1.0, or check the data for "
            f"broken images or labels."
        )


def _last_good(trainer: L.Trainer) -> str:
    callback: Any = getattr(trainer, "checkpoint_callback", None)
    return str(getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or "")
