"""Divergence guard: stop a run whose loss is no longer finite (or explodes) before it trains on garbage.

A NaN or infinite loss poisons the weights at the next optimizer step, and every later epoch then trains and
checkpoints garbage. :class:`DivergenceGuard` checks the loss on its device before each backward pass and reads
the verdict on the host before any checkpoint is written: the checkpoints already written (the last finished
epoch's ``last.ckpt``, the best one) stay the last good ones, and the run ends with a
:class:`~transfer.core.errors.DivergenceError` (exit status 2) naming the epoch, the step and the learning rates.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from transfer.core.errors import DivergenceError


class DivergenceGuard(L.Callback):
    """Stop training at the first non-finite loss, or at a loss above ``max_loss``.

    The loss is checked on its own device every step (no host synchronisation); the host reads the verdict every
    ``check_every`` steps and before every validation and epoch end, so a checkpoint never saves diverged
    weights. On a CPU reading is free, so the default checks every step there and the step that would apply the
    bad loss never runs; on an accelerator the default reads at the trainer's logging interval, so the run stops
    within that many steps of the first bad loss (named in the message) without stalling the device each step.

    Args:
        max_loss: also stop when the training loss exceeds this (``None``: only non-finite losses stop).
        check_every: host reads of the verdict, in steps; ``None``: 1 on a CPU, ``trainer.log_every_n_steps``
            elsewhere.
    """

    def __init__(self, max_loss: float | None = None, check_every: int | None = None) -> None:
        if max_loss is not None and not max_loss > 0:
            raise ValueError(f"max_loss must be positive or None, got {max_loss}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be >= 1 or None, got {check_every}")
        self.max_loss, self.check_every = max_loss, check_every
        self._first_bad: Tensor | None = None  # [step, loss] of the first bad loss since the last read; step -1: none

    def _every(self, trainer: L.Trainer) -> int:
        if self.check_every is not None:
            return self.check_every
        # Trainer.log_every_n_steps is set by Lightning's logger connector, so its type is not declared
        every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]
        return 1 if trainer.strategy.root_device.type == "cpu" else max(1, int(every))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        if self.max_loss is not None:
            bad = bad | (value > self.max_loss)
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=value.device)
        record = torch.stack([torch.tensor(float(trainer.global_step), device=value.device), value])
        unset = self._first_bad[0] < 0
        self._first_bad = torch.where(bad & unset, record, self._first_bad)  # stays on the device
        if (trainer.global_step + 1) % self._every(trainer) == 0:
            self._read(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._read(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)

    def _read(self, trainer: L.Trainer) -> None:
        """The one host read: raise if a bad loss was seen since the last one."""
        if self._first_bad is None:
            return
        step, value = (float(v) for v in self._first_bad.tolist())
        if step < 0:
            return
        self._first_bad = None
        raise DivergenceError(self.message(trainer, value, int(step)))

    def message(self, trainer: L.Trainer, value: float, step: int | None = None) -> str:
        """What diverged, where, which checkpoint is the last good one, and what to change."""
        what = (
            "not finite" if not math.isfinite(value) else f"above callbacks.divergence_guard.max_loss={self.max_loss}"
        )
        rates = ", ".join(f"{name} {lr:.3g}" for name, lr in _rates(trainer).items()) or "n/a"
        last = _last_good(trainer)
        kept = (
            f"The last good checkpoint, {last}, is kept (resume=<it> continues from there)"
            if last
            else "No epoch finished, so there is no checkpoint to keep"
        )
        step = trainer.global_step if step is None else step
        where = (
            f"step {step} (batch {trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1} of the epoch)"
            if step == trainer.global_step
            else f"step {step} (seen at step {trainer.global_step})"
        )
        when = (
            "the run was stopped before that step updated the weights"
            if step == trainer.global_step
            else "the run was stopped at the next check of the loss, before any checkpoint saved those weights"
        )
        return (
            f"Training diverged: the loss was {value:g} ({what}) at epoch {trainer.current_epoch + 1}, {where}, with "
            f"learning rates {rates}; {when}. {kept}. Lower optimizer.lr, set trainer.gradient_clip_val=1.0, or "
            f"check the data for broken images or labels."
        )


def _last_good(trainer: L.Trainer) -> str:
    callback: Any = getattr(trainer, "checkpoint_callback", None)
    return str(getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or "")


def _rates(trainer: L.Trainer) -> dict[str, float]:
    """Each param group's lr by name, a no-weight-decay twin folded into its group (they share the lr)."""
    rates: dict[str, float] = {}
    for opt in trainer.optimizers:
        for i, group in enumerate(opt.param_groups):
            rates.setdefault(str(group.get("name", i)).removesuffix(".no_decay"), float(group["lr"]))
    return rates
