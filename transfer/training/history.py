"""Per-iteration loss, per-epoch metrics, training throughput and how many images each evaluation scored,
collected without per-step host syncs.

Epochs are numbered from 1 in the rows (and so in ``history.json``, the figures and ``summary.json``), as in the
log line each epoch ends with; ``trainer.current_epoch`` is Lightning's 0-based counter.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import Tensor

from transfer.data.batch import as_batch
from transfer.training.progress import epoch_label

_EPOCH_KEYS = ("train/loss_epoch", "train/acc", "val/loss", "val/acc")
log = logging.getLogger(__name__)


def _monitored_lrs(trainer: L.Trainer) -> dict[str, float]:
    """The latest rate per param group from the trainer's ``LearningRateMonitor``, as ``lr/<group>``.

    The monitor names a group ``lr-<Optimizer>/<group name>`` (``lr-<Optimizer>`` when there is one unnamed
    group); the part after the optimizer is kept, so ``lr-AdamW/backbone`` becomes ``lr/backbone``. In the
    epoch a run resumes inside (a mid-epoch checkpoint), Lightning skips ``on_train_epoch_start``, so the
    monitor has logged nothing yet; that one row takes the optimizer's current rates instead.
    """
    # Trainer.callbacks is assigned by Lightning's callback connector, so its type is not declared
    callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    monitor = next((cb for cb in callbacks if isinstance(cb, LearningRateMonitor)), None)
    if monitor is None:
        return {}
    logged = {name.split("/", 1)[-1]: values[-1] for name, values in monitor.lrs.items() if values}
    if not logged:
        logged = {
            group.get("name", f"pg{i + 1}"): group["lr"]
            for opt in trainer.optimizers
            for i, group in enumerate(opt.param_groups)
        }
    return {f"lr/{name}": float(lr) for name, lr in logged.items()}


def _sum_over_ranks(trainer: L.Trainer, pl_module: L.LightningModule, count: int) -> int:
    """``count`` summed over the ranks (itself on one device): one collective per evaluation, every rank calls it."""
    if trainer.world_size == 1:
        return count
    total = trainer.strategy.reduce(torch.tensor(count, device=pl_module.device), reduce_op="sum")
    return int(total.item()) if isinstance(total, Tensor) else int(total)


class History(L.Callback):
    """Records what the run's figures and summary need.

    Step losses stay on the device and are fetched once per epoch, so recording every iteration costs no
    GPU sync. Throughput counts only the time spent in training batches (data loading included, validation
    excluded).

    Attributes:
        step_loss: training loss of every optimisation step.
        epochs: one dict per finished epoch: ``epoch`` (from 1), ``train/loss``, ``train/acc``, ``val/loss``,
            ``val/acc``, and ``lr/<param group>``: the rates the trainer's ``LearningRateMonitor`` logged for
            the epoch (with ``logging_interval="epoch"``, those it started with), so the figures, the summary
            and the logger show one set of numbers. Without a monitor there are no lr columns.
        train_images: images seen in training batches.
        train_batch_seconds: wall time spent in training epochs up to their last batch.
        val_scored: images the latest validation (not the sanity check) scored, summed over ranks; ``None``
            before one. With ``limit_val_batches`` this is less than the split's size.
        test_scored: images the latest test scored, summed over ranks; ``None`` before one.
    """

    def __init__(self) -> None:
        self.step_loss: list[float] = []
        self.epochs: list[dict[str, float]] = []
        self.train_images = 0
        self.train_batch_seconds = 0.0
        self._pending: list[Tensor] = []
        self._epoch_start = 0.0
        self._last_batch_end = 0.0
        self.val_scored: int | None = None
        self.test_scored: int | None = None
        self._scoring = 0
        self._validated = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._validated = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._pending.append(loss.detach())
        self.train_images += len(as_batch(batch).y)  # images or cached features
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs validation before this hook, so val metrics of this epoch are in callback_metrics; an
        # epoch without one (a budget validates every k steps) would find the last one's there and gets none.
        self.train_batch_seconds += self._last_batch_end - self._epoch_start
        if self._pending:
            self.step_loss += torch.stack(self._pending).float().cpu().tolist()
            self._pending.clear()
        metrics = trainer.callback_metrics
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        for key in _EPOCH_KEYS:
            if key in metrics and (self._validated or not key.startswith("val/")):
                row[key.replace("_epoch", "")] = float(metrics[key])
        row.update(_monitored_lrs(trainer))
        self.epochs.append(row)
        # One line per epoch in run.log (and on the console), so runs without a progress bar still show progress.
        log.info(
            "%s: %s", epoch_label(trainer).lower(), ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scoring = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._scoring += len(as_batch(batch).y)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_scored = _sum_over_ranks(trainer, pl_module, self._scoring)
            self._validated = True

    # a test counts its images as a validation does
    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_scored = _sum_over_ranks(trainer, pl_module, self._scoring)

    @property
    def images_per_second(self) -> float:
        """Training throughput over all epochs."""
        return self.train_images / self.train_batch_seconds if self.train_batch_seconds > 0 else 0.0

    def save(self, path: Path) -> None:
        """Write step losses and epoch rows as JSON."""
        path.write_text(json.dumps({"step_loss": self.step_loss, "epochs": self.epochs}, indent=1))
