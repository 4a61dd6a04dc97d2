"""Test accuracy after every epoch, with the wall-clock time it was reached, for the time-to-accuracy race.

Added to a run as ``+callbacks.timeline._target_=transfer.benchmarks.timeline.TestTimeline``. At each
validation (after every training epoch) it also evaluates the test set with the weights the run would test
with at that point (the EMA when the run keeps one, since it swaps them in for validation first; flip TTA
when the run's ``tta`` is on) and prints one JSON line. Its own evaluation time is reported so the race can
subtract it: the run is not charged for measurements it would not otherwise make.
"""
from __future__ import annotations

import json
import time

import lightning as L
import torch


class TestTimeline(L.Callback):
    """Prints ``{"timeline": epoch, "unix_time": ..., "eval_seconds": cumulative, "test_acc": ...}`` per epoch."""

    def __init__(self) -> None:
        self.eval_seconds = 0.0

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        datamodule = trainer.datamodule
        correct = total = 0
        for x, y in datamodule.test_dataloader():
            x, y = datamodule.prepare_batch((x.to(pl_module.device), y.to(pl_module.device)), train=False)
            correct += int((pl_module.predict_logits(x).argmax(1) == y).sum())
            total += len(y)
        self.eval_seconds += time.perf_counter() - start
        print(json.dumps({"timeline": trainer.current_epoch + 1, "unix_time": time.time(),
                          "eval_seconds": round(self.eval_seconds, 2), "test_acc": correct / max(1, total)}),
              flush=True)
