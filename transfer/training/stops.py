"""Graceful stops: Ctrl-C (SIGINT) and SIGTERM save a resumable checkpoint and say how to resume.

Lightning turns SIGINT into ``KeyboardInterrupt`` and SIGTERM into ``SIGTERMException`` (raised at the next
batch boundary) and calls every callback's ``on_exception``; :class:`GracefulStop` then saves
``checkpoints/interrupted.ckpt`` (the current step: weights, optimizer, scheduler, loop progress) and prints
one line with the command that resumes it. :func:`~transfer.core.exit_status.graceful_exit` gives the process
the conventional status, 128 + the signal number (130 for SIGINT, 143 for SIGTERM), where Lightning would exit 1
(SIGINT) or 0 (SIGTERM).

On SLURM, Lightning's own SIGUSR1 handler (auto-requeue: save ``hpc_ckpt_<n>.ckpt``, ``scontrol requeue``) is
left in place; the SIGTERM SLURM sends at the end of the grace period is handled as above.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer.core.exit_status import STOPPED_BY, graceful_exit, resume_command

__all__ = ["GracefulStop", "graceful_exit", "resume_command"]


class GracefulStop(L.Callback):
    """Save ``<dirpath>/interrupted.ckpt`` when the run is stopped by SIGINT or SIGTERM.

    Args:
        dirpath: the run's checkpoint folder.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            signum = signal.SIGINT
        elif isinstance(exception, SIGTERMException):
            signum = signal.SIGTERM
        else:
            return
        STOPPED_BY["signal"] = int(signum)
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        path = self.dirpath / "interrupted.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        self.saved = path
        _announce(signal.Signals(signum).name, trainer, path)


@rank_zero_only
def _announce(name: str, trainer: L.Trainer, path: Path) -> None:
    print(
        f"\nstopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {path}. "
        f"Resume with: {resume_command(path)}",
        file=sys.stderr,
        flush=True,
    )
