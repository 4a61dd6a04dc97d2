"""SLURM auto-requeue at a batch boundary, not inside the signal handler.

Before a job's time limit SLURM sends ``#SBATCH --signal=USR1@90``'s signal. Lightning's own handler does the whole
requeue inside the handler: it flushes and closes every logger, saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol
requeue``. A handler runs on top of whatever the main thread was doing, and when that was TensorBoard's writer
(which holds a plain, non-reentrant lock while it queues or flushes an event), the handler's flush waits for that
lock forever: the job hangs until SLURM kills it, with no checkpoint and no requeue. Reproduced with SIGUSR1 at
random moments of a tiny run: 2 of 25 hung there (py-spy showed ``_AsyncWriter.flush`` inside itself).

:class:`SlurmRequeue` takes the signal first (Lightning leaves a signal that already has a handler alone), only
notes it in the handler, and does Lightning's requeue at the next training batch end or validation end: save
``hpc_ckpt_<n>.ckpt`` in the run directory, then ``scontrol requeue <job id>`` on rank 0. Training then goes on,
as with Lightning's handler, until SLURM's SIGTERM, which :class:`~transfer.training.stops.GracefulStop` handles.
A signal during the final test is taken and left: training has finished, so there is nothing to requeue for, and
the SIGTERM that follows stops the test with the trained run's outputs written.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class SlurmRequeue(L.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` and requeue the SLURM job at a safe point after its requeue signal.

    Active only where Lightning would requeue: a ``SLURMEnvironment`` with ``auto_requeue`` (a job started by
    sbatch/srun, not an interactive one). Elsewhere it does nothing and installs nothing.

    With one process the handler's note is read at every batch end (a Python flag, no device sync). Under DDP
    the ranks agree on it in one collective every ``trainer.log_every_n_steps`` steps, all ranks at the same
    step, so the checkpoint every rank takes part in is saved at the same step on all of them.
    """

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous: Any = None
        self._noted = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = _requeue_environment(trainer)
        if env is None or env.requeue_signal is None or threading.current_thread() is not threading.main_thread():
            return
        self._signum = int(env.requeue_signal)
        # Before Lightning registers its handlers (after the setup hooks): it then leaves this signal to us. In the
        # test the note is never acted on: training has finished, and SLURM's SIGTERM stops the test with the
        # trained run's outputs written (GracefulStop), where Lightning would requeue the whole job.
        self._previous = signal.signal(self._signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._noted = True  # all the handler does: the work waits for a batch boundary

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = int(trainer.log_every_n_steps)  # type: ignore[attr-defined]  # set by the logger connector
        if trainer.world_size > 1 and trainer.global_step % max(1, every) != 0:
            return
        self._requeue_if_noted(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._requeue_if_noted(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._signum = None

    def _requeue_if_noted(self, trainer: L.Trainer) -> None:
        if self._signum is None:
            return
        noted = self._noted
        if trainer.world_size > 1:
            noted = trainer.strategy.reduce_boolean_decision(noted, all=False)
        if not noted:
            return
        self._noted = False
        log.info("SLURM requeue signal %d: saving a checkpoint and requeueing the job", self._signum)
        for logger in trainer.loggers:
            logger.save()
        path = hpc_checkpoint_path(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            requeue_job()


def hpc_checkpoint_path(folder: Path) -> Path:
    """``folder/hpc_ckpt_<n>.ckpt`` with ``n`` one past the highest there: the name Lightning resumes from."""
    names = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name) for p in folder.glob("hpc_ckpt_*.ckpt"))
    numbers = [int(m.group(1)) for m in names if m]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_job() -> int:
    """Run ``scontrol requeue`` for this job (an array task as ``<array job>_<task>``) and log the outcome.

    Returns:
        scontrol's exit status.
    """
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeueing: SLURM job id %r is not a job id", job)
        return 1
    try:
        status = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        log.warning("could not requeue SLURM job %s: scontrol is not on this node's PATH", job)
        return 127
    if status == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("requeueing SLURM job %s failed: scontrol exited with %d", job, status)
    return status


def _requeue_environment(trainer: L.Trainer) -> SLURMEnvironment | None:
    """The trainer's SLURM environment where Lightning would auto-requeue, else ``None``."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:  # a single-device strategy keeps it on the accelerator connector only
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env if isinstance(env, SLURMEnvironment) and env.auto_requeue else None
