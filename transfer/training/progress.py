"""What a run shows on the console while it trains: a progress bar that refreshes on time, and a one-line summary
of the model at fit start.

Lightning's ``TQDMProgressBar`` refreshes every ``refresh_rate`` batches and reads the logged metrics (the loss
with ``.item()``, a device sync on a GPU) at every refresh. A rate of 1 syncs every step; a rate of 20 leaves a CPU
run silent for its first minute. :class:`TimedProgressBar` refreshes by the clock instead: at most once per
``refresh_seconds``, and always at an epoch's last batch, so the bar moves on a slow CPU and a fast GPU pays one
sync a second.

Lightning's model summary counts the trainable parameters at fit start, before staged unfreezing has acted, and
adds a FLOPs column that is 0 unless a model declares an example input; ``conf/trainer/default.yaml`` switches it
off and :class:`FitSummary` logs one line instead.

Epochs are numbered from 1 on everything a person reads (the bar, the log, ``history.json``, the figures,
``summary.json``); Lightning's own counters (``trainer.current_epoch``) stay 0-based inside the code.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from torch import nn

from transfer.training.finetune import finetune_plan

log = logging.getLogger(__name__)


def epoch_label(trainer: L.Trainer) -> str:
    """``Epoch 3/10`` for the trainer's current epoch, numbered from 1 (``Epoch 3`` when the run has no fixed
    length: ``max_epochs`` -1 or unset)."""
    total = trainer.max_epochs
    return f"Epoch {trainer.current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")


class TimedProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, refreshed at most every ``refresh_seconds`` (and at each bar's last batch).

    Args:
        refresh_seconds: the shortest time between two refreshes; each refresh reads the logged metrics once.
    """

    def __init__(self, refresh_seconds: float = 1.0) -> None:
        super().__init__(refresh_rate=1)  # every batch asks; the clock decides (see _should_update)
        self.refresh_seconds = float(refresh_seconds)
        self._last_refresh = float("-inf")

    def _should_update(self, current: int, total: int) -> bool:
        # Lightning asks this after every train, validation, test and predict batch before it refreshes a bar
        # and, for the training bar, reads the metrics for its postfix.
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_refresh >= self.refresh_seconds:
            self._last_refresh = now
            return True
        return False

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Lightning's epoch start, with the epoch numbered from 1 and the run's length: ``Epoch 1/N``.

        Lightning's own steps, not a call to them: its description (``Epoch 0``) would be drawn before this one.
        """
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset()
        bar.total = convert_inf(self.total_train_batches)
        bar.initial = 0
        bar.set_description(epoch_label(trainer))


def _count(n: int) -> str:
    """``3.4 M``, ``12.8 K``, ``512``: parameter counts as Lightning's summary shows them."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def frozen_phrase(unfreeze_at_epoch: int | None) -> str:
    """How long the backbone stays frozen, in epochs numbered from 1.

    Args:
        unfreeze_at_epoch: ``finetune.unfreeze_at_epoch``: how many epochs train the head alone (``None``: all).
    """
    if unfreeze_at_epoch is None:
        return "backbone frozen for the whole run (linear probe)"
    if unfreeze_at_epoch == 0:
        return "nothing frozen"
    first = "epoch 1" if unfreeze_at_epoch == 1 else f"epochs 1-{unfreeze_at_epoch}"
    return f"backbone frozen in {first}, trained from epoch {unfreeze_at_epoch + 1}"


def parameter_line(name: str, module: nn.Module, unfreeze_at_epoch: int | None, fixed: int = 0) -> str:
    """The model summary a run logs: name, parameters in all, those trainable now, and the freezing schedule.

    Args:
        name: the model's name.
        module: the module being trained (its ``requires_grad`` flags as the next step will see them).
        unfreeze_at_epoch: ``finetune.unfreeze_at_epoch`` (see :func:`frozen_phrase`).
        fixed: parameters that never train (``model.frozen_layers``).
    """
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    phrase = frozen_phrase(unfreeze_at_epoch)
    if fixed:
        rest = "the rest trains from the start" if unfreeze_at_epoch == 0 else phrase
        phrase = f"{_count(fixed)} in the lowest layers kept at their weights throughout (model.frozen_layers), {rest}"
    return (
        f"model {name}: {_count(total)} parameters ({total:,}), {_count(trainable)} ({trainable:,}) trainable at "
        f"the first step; {phrase}"
    )


class FitSummary(L.Callback):
    """Logs :func:`parameter_line` once per fit, when training starts.

    At ``on_train_start`` the staged fine-tuning callback (which runs before this one) has set ``requires_grad``
    for the epoch the fit starts in, a resumed one included, so "trainable" is what the first step trains.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        meta = getattr(model, "meta", None)
        name = getattr(meta, "name", None) or type(model).__name__
        if not trainer.is_global_zero:
            return
        fixed = set(getattr(model, "fixed", []))
        backbone = getattr(model, "backbone", None)
        named = backbone.named_parameters() if isinstance(backbone, nn.Module) else []
        count = sum(p.numel() for n, p in named if n in fixed)
        log.info("%s", parameter_line(name, pl_module, finetune_plan(trainer).unfreeze_at_epoch, count))
