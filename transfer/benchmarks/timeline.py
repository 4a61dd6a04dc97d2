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
from torch.utils.data import DataLoader

from transfer.data import ClassificationData
from transfer.training.module import Classifier


@torch.no_grad()
def accuracy(module: Classifier, datamodule: ClassificationData, loader: DataLoader) -> float:
    """Accuracy of ``module`` as it is now over one of ``datamodule``'s image loaders, in a plain loop (flip TTA
    when the module's ``tta`` is on).

    Not ``Trainer.predict``: the timeline runs inside the fit it measures, and a second Trainer would take over
    the module's trainer reference in the middle of that fit.
    """
    was_training = module.training
    module.eval()
    correct = total = 0
    try:
        for batch in loader:
            batch = datamodule.prepare_batch([t.to(module.device) for t in batch[:2]], train=False)
            correct += int((module.predict_logits(batch.x).argmax(1) == batch.y).sum())  # flip TTA when on
            total += len(batch.y)
    finally:
        module.release_inference_model()  # folded from the weights of now: training moves them on
        module.train(was_training)
    return correct / total if total else 0.0


class TestTimeline(L.Callback):
    """Prints ``{"timeline": epoch, "unix_time": ..., "eval_seconds": cumulative, "test_acc": ...}`` per epoch."""

    def __init__(self) -> None:
        self.eval_seconds = 0.0

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at fit time, undeclared
        test_acc = accuracy(pl_module, datamodule, datamodule.test_dataloader())  # type: ignore[arg-type]
        self.eval_seconds += time.perf_counter() - start
        print(
            json.dumps(
                {
                    "timeline": trainer.current_epoch + 1,
                    "unix_time": time.time(),
                    "eval_seconds": round(self.eval_seconds, 2),
                    "test_acc": test_acc,
                }
            ),
            flush=True,
        )
