"""The console while a run trains: a bar refreshed by the clock with epochs numbered from 1, and the model line."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.training.progress import TimedProgressBar, frozen_phrase, parameter_line

BATCHES, EPOCHS = 8, 2


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(2 * BATCHES, 4), torch.randint(0, 2, (2 * BATCHES,))), batch_size=2)


class _CountingBar(TimedProgressBar):
    """Counts the metric reads (each one a device sync on a GPU: the logged loss goes through ``.item()``)."""

    def __init__(self, refresh_seconds: float) -> None:
        super().__init__(refresh_seconds)
        self.reads = 0

    def get_metrics(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.reads += 1
        return super().get_metrics(*args, **kwargs)


def _fit(bar: TimedProgressBar) -> None:
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        callbacks=[bar],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(_Tiny())


@pytest.mark.parametrize("seconds", [0.0, 3600.0])
def test_the_bar_reads_the_metrics_by_the_clock_not_every_step(seconds: float):
    bar = _CountingBar(refresh_seconds=seconds)
    _fit(bar)
    per_epoch_end = EPOCHS  # Lightning's epoch-end refresh, once per epoch
    if seconds == 0:
        assert bar.reads == BATCHES * EPOCHS + per_epoch_end  # no time between refreshes: every batch
    else:
        # the run's first batch, then only each epoch's last batch (a bar always ends complete)
        assert bar.reads == 1 + EPOCHS + per_epoch_end


def test_the_bar_numbers_epochs_from_1_of_the_runs_length():
    bar = TimedProgressBar()
    _fit(bar)
    assert bar.train_progress_bar.desc.startswith(f"Epoch {EPOCHS}/{EPOCHS}")


def test_the_model_line_counts_what_the_first_step_trains():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))  # 110 + 22 parameters
    model[0].requires_grad_(False)
    line = parameter_line("tiny", model, 1)
    assert line.startswith("model tiny: 132 parameters (132), 22 (22) trainable at the first step")
    assert line.endswith("backbone frozen in epoch 1, trained from epoch 2")


def test_the_model_line_names_the_layers_that_never_train():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    model[0].requires_grad_(False)
    line = parameter_line("tiny", model, 0, fixed=110)
    assert "22 (22) trainable" in line and "nothing frozen" not in line
    assert line.endswith(
        "110 in the lowest layers kept at their weights throughout (model.frozen_layers), the rest "
        "trains from the start"
    )


def test_the_freezing_schedule_is_told_in_epochs_numbered_from_1():
    assert frozen_phrase(0) == "nothing frozen"
    assert frozen_phrase(3) == "backbone frozen in epochs 1-3, trained from epoch 4"
    assert "whole run" in frozen_phrase(None)
