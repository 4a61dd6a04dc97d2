"""Graceful stops: Ctrl-C (SIGINT) and SIGTERM save a resumable checkpoint and say how to resume.

:func:`~transfer.core.exit_status.stop_on_signals` (active around every run) raises
:class:`~transfer.core.exit_status.Stopped` at the first signal, except while training steps run: there the
signal waits for the next batch boundary (:class:`GracefulStop` defers it from the start of training to its end,
validation excepted), so no optimizer step is cut in half. A signal held at an epoch's end stops the run at the next
epoch's first batch: the end of an epoch (its history row, checkpoints, scheduler step) is never cut in half either,
since a resume does not run it again. Lightning calls every callback's
``on_exception``; :class:`GracefulStop` then saves ``checkpoints/interrupted.ckpt`` (the current step: weights,
optimizer, scheduler, loop progress, the data loader's position) and prints one line with the command that
resumes it. A stop before the first training step (decoding, feature caching) has nothing to save and says so.
:func:`~transfer.core.exit_status.graceful_exit` gives the process the conventional status, 128 + the signal number
(130 for SIGINT, 143 for SIGTERM), where Lightning would exit 1 (SIGINT) or 0 (SIGTERM).

On SLURM, the requeue signal (SIGUSR1: save ``hpc_ckpt_<n>.ckpt``, ``scontrol requeue``) is handled at the next
batch boundary by :class:`~transfer.training.requeue.SlurmRequeue`; the SIGTERM SLURM sends at the end of the
grace period is handled as above.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from transfer.core.exit_status import (
    STOPPED_BY,
    Stopped,
    announce_stop,
    defer_stops,
    graceful_exit,
    pending_stop,
    resume_command,
    stop_signal,
)

__all__ = ["GracefulStop", "Stopped", "graceful_exit", "resume_command", "stoppable", "writing_outputs"]
T = TypeVar("T")


class GracefulStop(L.Callback):
    """Save ``<dirpath>/interrupted.ckpt`` when the run is stopped by SIGINT or SIGTERM.

    Args:
        dirpath: the run's checkpoint folder.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        defer_stops(True)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        defer_stops(True)  # also on the first batch of an epoch a mid-epoch checkpoint resumes inside
        signum = pending_stop()
        if signum is not None:
            STOPPED_BY.pop("pending", None)
            raise Stopped(signum)  # before the step: the checkpoint holds every batch trained so far

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._act_now()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # back to holding signals inside a fit (Lightning sets trainer.training again only after this hook)
        defer_stops(trainer.state.fn == TrainerFn.FITTING)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._act_now()

    @staticmethod
    def _act_now() -> None:
        """Leave the deferred window: a signal held since the last step stops the run here."""
        defer_stops(False)
        signum = pending_stop()
        if signum is not None:
            STOPPED_BY.pop("pending", None)
            raise Stopped(signum)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        defer_stops(False)
        signum = stop_signal(exception)
        if signum is None:
            return
        STOPPED_BY["signal"] = int(signum)
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        name = signal.Signals(signum).name
        if trainer.global_step == 0 and not trainer.fit_loop.epoch_loop.batch_progress.total.completed:
            announce_stop(signum, "before the first training step (while preparing data); nothing to resume.")
            return
        path = self.dirpath / "interrupted.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        self.saved = path
        _announce(name, trainer, path)


def stoppable(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T | None, int | None]:
    """``(fn(*args, **kwargs), None)``, or ``(None, signal)`` when a SIGINT/SIGTERM stopped it.

    Lightning turns an interrupt inside ``trainer.fit``/``trainer.test`` into ``SystemExit(1)`` after calling
    ``on_exception``; this gives the caller the signal instead, so it can write what had finished.
    """
    try:
        return fn(*args, **kwargs), None
    except (KeyboardInterrupt, SystemExit) as err:
        signum = stop_signal(err)
        if signum is None:
            raise
        return None, signum


@rank_zero_only
def announce_untested(signum: int, run_dir: Path, best: str) -> None:
    """The stop line of a run stopped while testing: training finished and its outputs are written."""
    announce_stop(
        signum,
        f'while testing: training had finished, so {run_dir}/summary.json ("tested": false), history.json and '
        f"the figures are written. Test the best checkpoint with: python -m transfer.evaluate ckpt={best or run_dir}",
    )


@contextlib.contextmanager
def writing_outputs(run_dir: Path) -> Iterator[None]:
    """Say which outputs a stop while writing them may have left out, and let the stop go on."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as err:
        signum = stop_signal(err)
        if signum is not None and STOPPED_BY.get("announced") != signum:
            STOPPED_BY["announced"] = signum
            announce_stop(
                signum,
                f"while writing the outputs in {run_dir}; some of summary.json, history.json and "
                "the figures may be missing (the checkpoints are complete).",
            )
        raise


@rank_zero_only
def _announce(name: str, trainer: L.Trainer, path: Path) -> None:
    print(
        f"\nstopped by {name} at epoch {trainer.current_epoch + 1}, step {trainer.global_step}; saved {path}. "
        f"Resume with: {resume_command(path)}",
        file=sys.stderr,
        flush=True,
    )
