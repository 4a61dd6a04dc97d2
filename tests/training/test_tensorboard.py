"""transfer/training/tensorboard.py: the HParams entry is on disk, whole, when ``log_hparams`` returns."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from transfer.training.tensorboard import log_hparams


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_log_hparams_leaves_no_writer_open(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    trainer = L.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logger.log_metrics({"val/acc": 0.5}, step=0)
    logger.finalize("success")  # what the Trainer does when fit or test ends; log_hparams comes after it
    log_hparams(trainer, {"lr": 1e-3}, {"test_acc": 0.75, "best_val_acc": None})
    written = _digests(tmp_path)
    scalars: set[str] = set()
    for events in tmp_path.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert "hp/test_acc" in scalars and "hp/best_val_acc" not in scalars  # flushed by the time it returned
    # closed: a writer left open flushes from its own thread at some later moment (10 ms later on a loaded
    # machine changed an earlier run's file under a caller that had hashed it)
    assert logger._experiment is None or logger._experiment.all_writers is None
    time.sleep(0.1)
    assert _digests(tmp_path) == written
