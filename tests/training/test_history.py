"""History's lr columns come from Lightning's LearningRateMonitor: one source for history.json and the logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.training.history import History


class _TwoPart(L.LightningModule):
    """A head trained from the start and a backbone whose param group arrives at epoch 1 (as at an unfreeze)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.SGD([{"params": self.head.parameters(), "name": "head"}], lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)


class _AddBackboneGroup(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            trainer.optimizers[0].add_param_group(
                {"params": pl_module.backbone.parameters(), "name": "backbone", "lr": 0.01}
            )


def _fit(tmp_path: Path, *callbacks: L.Callback, logger: bool = True) -> History:
    history = History()
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[_AddBackboneGroup(), *callbacks, history],
        accelerator="cpu",
        logger=CSVLogger(tmp_path) if logger else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(_TwoPart())
    return history


def test_lr_columns_are_what_the_lr_monitor_logged_at_each_epoch_start(tmp_path: Path):
    monitor = LearningRateMonitor("epoch")
    history = _fit(tmp_path, monitor)
    lrs = [{k: v for k, v in row.items() if k.startswith("lr/")} for row in history.epochs]
    # StepLR halves every group after each epoch; the backbone group joins at epoch 1 with its own rate.
    assert lrs == [
        {"lr/head": pytest.approx(0.1)},
        {"lr/head": pytest.approx(0.05), "lr/backbone": pytest.approx(0.01)},
        {"lr/head": pytest.approx(0.025), "lr/backbone": pytest.approx(0.005)},
    ]
    assert monitor.lrs == {
        "lr-SGD/head": [row["lr/head"] for row in lrs],
        "lr-SGD/backbone": [row["lr/backbone"] for row in lrs[1:]],
    }


def test_without_an_lr_monitor_history_has_no_lr_columns(tmp_path: Path):
    history = _fit(tmp_path, logger=False)
    assert len(history.epochs) == 3 and not any(k.startswith("lr/") for row in history.epochs for k in row)


class _Scored(_TwoPart):
    """_TwoPart with validation and test on 10 images in batches of 4 (4 + 4 + 2)."""

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self.head(self.backbone(x)).argmax(1) == y).float().mean())

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(10, 4), torch.randint(0, 2, (10,))), batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _quiet_trainer(history: History, **args) -> L.Trainer:
    """A CPU trainer with ``history`` and nothing else: no logger, checkpoints, bar or summary."""
    return L.Trainer(
        callbacks=[history],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **args,
    )


def test_rows_are_numbered_from_1_and_the_scored_images_are_counted(tmp_path: Path):
    history = History()
    trainer = _quiet_trainer(
        history,
        max_epochs=2,
        num_sanity_val_steps=1,  # the sanity check's batch is not a validation: it must not count
        limit_val_batches=2,  # 2 of the 3 batches: 8 of the 10 images
    )
    module = _Scored()
    trainer.fit(module)
    assert [row["epoch"] for row in history.epochs] == [1, 2] and history.test_scored is None
    assert history.val_scored == 8
    trainer.limit_test_batches = 1.0
    trainer.test(module, verbose=False)
    assert history.test_scored == 10 and history.val_scored == 8


def test_an_epoch_without_a_validation_has_no_val_columns(tmp_path: Path):
    # a budget validates every k steps, not every epoch: the rows in between must not repeat the last score
    history = History()
    trainer = _quiet_trainer(
        history,
        max_epochs=3,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=1,  # its metrics are in callback_metrics too before the first epoch ends
    )
    trainer.fit(_Scored())
    assert ["val/acc" in row for row in history.epochs] == [False, True, False]
