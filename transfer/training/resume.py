"""What a checkpoint needs beyond Lightning's own state for a resumed run to continue exactly.

Lightning restores weights, optimizer, schedulers, loop progress and each callback's ``state_dict``. It does
not save the random number generators (augmentation and MixUp/CutMix draw from the global ones, on the device
for the batched augmentation), it restarts an epoch it resumes inside from the loader's first batch, and it
skips the ``ReduceLROnPlateau`` step of the epoch a checkpoint was written in (checkpoints are written during
validation, before that step; on resume the metric it needs is gone). :class:`RunState` adds all three (each
rank's RNG streams; the loader's place through :class:`~transfer.data.loader.ResumableLoader`), and the
:class:`~transfer.training.history.History` behind the run's figures and summary, so that a resumed run's outputs
cover the whole run; and it re-plans the lr schedule where the resumed run's settings differ
(:func:`~transfer.training.optim.replan`). :class:`EpochCheckpoint` keeps ``last.ckpt`` at the last finished epoch,
and :class:`MidEpochCheckpoint` adds saves inside long epochs.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.optim.lr_scheduler import ReduceLROnPlateau

from transfer.data.loader import ResumableLoader
from transfer.training.budget import BudgetPlanner
from transfer.training.history import History
from transfer.training.optim import replan

log = logging.getLogger(__name__)

_HISTORY_FIELDS = ("step_loss", "epochs", "train_images", "train_batch_seconds")


class RunState(L.Callback):
    """Checkpoint the RNG streams (each rank's), the pending plateau-scheduler step, the run's length and its
    :class:`History`; on resume, put them back, continue the training loader at its place in the epoch and
    re-plan the lr schedule where this run's settings differ from the checkpoint's.

    Args:
        history: the run's history callback, saved and restored with the checkpoint.
    """

    def __init__(self, history: History) -> None:
        self.history = history
        self._restored: dict[str, Any] | None = None
        self._saved_settings: dict[str, Any] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._between_batches = rng_states()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._between_batches = rng_states()

    def _rng_for_checkpoint(self) -> dict[str, Any]:
        """The streams as they were after the last trained batch.

        A stop raised before a step (``on_train_batch_start``: a pending signal) comes after Lightning moved
        that batch to the device, where the batched augmentation already drew its parameters; the checkpoint
        resumes before that batch, so it gets the streams from before it (kept at every batch end).
        """
        trainer = self._trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress.current if trainer is not None else None
        if progress is not None and progress.ready > _processed(progress) and self._between_batches is not None:
            return self._between_batches
        return rng_states()

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        rng = self._rng_for_checkpoint()
        return {
            "rng": rng,
            "rng_per_rank": _gathered(trainer, rng) if trainer is not None else [],
            "history": {k: getattr(self.history, k) for k in _HISTORY_FIELDS},
            "pending_plateau": _pending_plateau(trainer) if trainer is not None else [],
            "max_epochs": trainer.max_epochs if trainer is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage not in (None, "fit"):
            return  # a test from the best checkpoint: nothing of the training state applies
        self._restored = state_dict

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._stage in (None, "fit"):  # the settings the checkpoint was trained with, for replan
            saved = checkpoint.get("hyper_parameters") or {}
            self._saved_settings = {k: saved.get(k) for k in ("optimizer", "scheduler") if k in saved}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._stage = trainer, stage

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning's restore: the history, the owed plateau step, the schedule, the loader's place and the
        RNG streams, in that order (nothing may draw random numbers after the streams are put back)."""
        state, self._restored = self._restored, None
        if not state:
            return
        for key, value in state.get("history", {}).items():
            setattr(self.history, key, value)
        _continue_tensorboard(trainer)
        configs = trainer.lr_scheduler_configs
        for index, value in state.get("pending_plateau", []):
            configs[index].scheduler.step(value)
        self._replan(trainer, pl_module)
        _continue_loader(trainer)
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == trainer.world_size:
            set_rng_states(per_rank[trainer.global_rank])
        elif state.get("rng"):
            if trainer.world_size > 1:
                log.warning("resume: the checkpoint holds rank 0's RNG streams only; every rank continues from them")
            set_rng_states(state["rng"])

    def _replan(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saved_settings or not trainer.optimizers:
            return
        if any(isinstance(cb, BudgetPlanner) for cb in trainer.callbacks):  # type: ignore[attr-defined]
            return  # budget= plans the schedule's length itself, from what is left of the budget
        settings = {k: pl_module.hparams.get(k) for k in ("optimizer", "scheduler")}
        done = replan(
            trainer.optimizers[0],
            trainer.lr_scheduler_configs,
            settings,
            self._saved_settings,
            trainer.estimated_stepping_batches,
        )
        if done:
            rank_zero_info(f"resume: the lr schedule was re-planned for this run's settings; it {done}")

    _trainer: L.Trainer | None = None
    _stage: str | None = None
    _between_batches: dict[str, Any] | None = None


def _gathered(trainer: L.Trainer, states: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``states`` (rank order); every rank calls it, as every rank builds the checkpoint."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [states]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def _continue_loader(trainer: L.Trainer) -> None:
    """Restart the training loader's iterator at the epoch's order and the first batch not yet trained on.

    Lightning made the iterator (and fetched its first batch) before this hook, from the epoch's first batch;
    its own count of the batches done (``batch_progress``, restored) says how many to skip.
    """
    loop = trainer.fit_loop
    loaders = [dl for dl in (loop._combined_loader.flattened if loop._combined_loader else [])]
    fetcher = loop._data_fetcher
    if fetcher is None or not loaders or not all(isinstance(dl, ResumableLoader) for dl in loaders):
        return
    # What Lightning will count as done when its epoch loop resets (a restart inside the epoch: the batches
    # processed; an epoch that had finished: none) and the epoch it will give the samplers.
    processed = _processed(loop.epoch_loop.batch_progress.current)
    inside = loop.epoch_loop.restarting and processed < trainer.num_training_batches
    done, epoch = (processed if inside else 0), _processed(loop.epoch_progress.current)
    for loader in loaders:
        loader.start_at(epoch, done)
    iter(fetcher)
    if done:
        rank_zero_info(f"resume: epoch {epoch + 1} continues after its batch {done}")  # epochs counted from 1


def _processed(tracker: Any) -> int:
    """A progress tracker's ``processed`` count (Lightning types ``current`` as a tracker without it)."""
    return int(getattr(tracker, "processed", tracker.completed))


def _pending_plateau(trainer: L.Trainer) -> list[tuple[int, float]]:
    """``(scheduler index, metric)`` for each plateau scheduler whose step of this epoch is still to come.

    A checkpoint written at the end of an epoch (validation just ran, the epoch-interval step has not) owes
    the plateau schedulers their step with the metric they monitor.
    """
    loop = trainer.fit_loop.epoch_loop
    current = loop.batch_progress.current
    if not loop.batch_progress.is_last_batch or _processed(current) < current.ready:
        return []  # inside the epoch (a stop before its last step included): its scheduler step is to come
    pending = []
    for index, config in enumerate(trainer.lr_scheduler_configs):
        if isinstance(config.scheduler, ReduceLROnPlateau) and config.interval == "epoch" and config.monitor:
            value = trainer.callback_metrics.get(config.monitor)
            if value is not None:
                pending.append((index, float(value)))
    return pending


def rng_states() -> dict[str, Any]:
    """The global RNG streams (torch, CUDA, NumPy, Python) in types a ``weights_only`` load accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA only when this machine has as many devices)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class EpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the last finished epoch, and whose best checkpoints hold
    what using a model needs.

    Lightning 2.6 rewrites ``last.ckpt`` only in an epoch that also saved a new top-k checkpoint, so after the
    best epoch it falls behind, and a resumed run repeats the epochs since. Here it is written at the end of
    every epoch (after the top-k save, in the same hook), through the run's (atomic) checkpoint IO.

    Resumed into a new run directory, Lightning keeps only the old best path and forgets its score, so the
    first resumed epoch would count as the best whatever its accuracy. Here the best checkpoint is copied into
    the new directory and its score kept: model selection continues over the whole run, and the original
    run's files are never deleted by the top-k bookkeeping.

    ``last.ckpt`` carries everything a resume needs. A best checkpoint (``best-epochNN.ckpt``, ``NN`` the 1-based
    epoch) carries the weights (with an EMA, the averaged ones as ``state_dict`` and the live ones as
    ``current_model_state``, as Lightning's ``WeightAveraging`` stores them), the hyper-parameters and the
    ``transfer`` entry (class names, preprocessing), and its validation score under ``selection``; the optimizer,
    scheduler, loop and callback states only with ``save_optimizer`` (then it is resumable too). What is kept once
    the run has tested: ``keep`` best checkpoints (0: none, the best is written for the run's own test and removed
    after it; in a ``-m`` sweep :func:`transfer.experiments.sweep.keep_sweep_best` keeps the best job's), and
    ``last.ckpt`` unless ``keep_last`` is false.

    Args:
        keep: best checkpoints to keep (Lightning's ``save_top_k``, at least 1 while training).
        keep_last: keep ``last.ckpt`` after the run's test (it is written every epoch either way, for a resume).
        save_optimizer: write the full training state into the best checkpoints too.
        **kwargs: :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s arguments.
    """

    _stage: str | None = None

    def __init__(self, keep: int = 1, keep_last: bool = True, save_optimizer: bool = False, **kwargs: Any) -> None:
        super().__init__(save_top_k=max(1, keep), save_last=True, **kwargs)
        self.keep, self.keep_last, self.save_optimizer = keep, keep_last, save_optimizer
        self._saving_last = False

    def format_checkpoint_name(
        self,
        metrics: dict[str, torch.Tensor],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        """Best checkpoints are named by the 1-based epoch (``best-epoch02.ckpt`` is the 2nd epoch's)."""
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        self._saving_last = True
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._saving_last = False

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._saving_last:
            super()._save_checkpoint(trainer, filepath)
            return
        # The full dump, so that callbacks (the EMA's WeightAveraging) put their weights in; then, unless
        # save_optimizer, the training state is left out.
        best = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if not self.save_optimizer:
            dropped = {*TRAINING_STATE, type(trainer.precision_plugin).__qualname__}
            best = {key: value for key, value in best.items() if key not in dropped}
        score = self._monitor_candidates(trainer).get(self.monitor) if self.monitor else None
        best["selection"] = {"monitor": self.monitor, "mode": self.mode, "score": _number(score)}
        trainer.strategy.save_checkpoint(best, filepath)
        trainer.strategy.barrier("EpochCheckpoint.save_best")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run has tested its best checkpoint: remove what ``keep`` and ``keep_last`` do not keep."""
        if not self.keep_last and self.last_model_path:
            trainer.strategy.remove_checkpoint(self.last_model_path)
            self.last_model_path = ""
        if self.keep == 0 and self.best_k_models and not _in_sweep():
            for path in list(self.best_k_models):
                trainer.strategy.remove_checkpoint(path)
            self.best_k_models, self.best_model_path, self.kth_best_model_path = {}, "", ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage not in (None, "fit"):
            return  # trainer.test(ckpt_path=best) restores callbacks too: keep this run's paths, not the best's
        with warnings.catch_warnings():  # "won't be reloaded": the score and the best file are, just below
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        score, best = state_dict.get("best_model_score"), state_dict.get("best_model_path") or ""
        if self.dirpath is None or state_dict.get("dirpath") == self.dirpath or score is None or not best:
            return
        local = Path(self.dirpath) / Path(best).name
        if Path(best).is_file():
            _copy_rank_zero(Path(best), local)
        self.best_model_score, self.best_model_path = score, str(local)
        self.best_k_models, self.kth_best_model_path, self.kth_value = {str(local): score}, str(local), score

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# What a resume needs and a model in use does not: left out of best checkpoints unless save_optimizer.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (torch.Tensor, int, float)) else None


def _in_sweep() -> bool:
    """Whether this run is a job of a Hydra ``-m`` sweep (whose end decides which best checkpoint stays)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@rank_zero_only
def _copy_rank_zero(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


@rank_zero_only
def _continue_tensorboard(trainer: L.Trainer) -> None:
    """Copy the resumed run's TensorBoard event files next to this run's, so TensorBoard shows one run.

    The original run directory is only read. Steps the interrupted run logged after its checkpoint appear
    twice (its values and the resumed run's).
    """
    ckpt, log_dir = trainer.ckpt_path, getattr(trainer.logger, "log_dir", None)
    if not ckpt or not log_dir:
        return
    source = Path(ckpt).parent.parent / "tensorboard"
    if not source.is_dir() or source.resolve() == Path(log_dir).resolve():
        return
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    for events in sorted(source.glob("events.out.tfevents.*")):
        shutil.copy2(events, Path(log_dir) / f"{events.name}.resumed-from")


class MidEpochCheckpoint(L.Callback):
    """Save ``checkpoints/mid-epoch.ckpt`` every ``every_n_steps`` optimizer steps and/or ``every_n_minutes``.

    For epochs long enough that losing one hurts; ``last.ckpt`` stays the last finished epoch. The file is
    overwritten each time (atomically), and the last batch of an epoch is left to the epoch-end save.
    Resuming from it continues at that step (Lightning skips the batches already trained on).

    Args:
        every_n_steps: save every this many optimizer steps (``None``: not by steps).
        every_n_minutes: save when this many minutes have passed since the last save (``None``: not by time).
    """

    def __init__(self, every_n_steps: int | None = None, every_n_minutes: float | None = None) -> None:
        if (every_n_steps is not None and every_n_steps < 1) or (every_n_minutes is not None and every_n_minutes <= 0):
            raise ValueError("every_n_steps must be >= 1 and every_n_minutes > 0 (or None)")
        self.every_n_steps, self.every_n_minutes = every_n_steps, every_n_minutes
        self._last_save = time.monotonic()
        self.saved: Path | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps is None and self.every_n_minutes is None:
            return
        due = bool(self.every_n_steps and trainer.global_step % self.every_n_steps == 0)
        if self.every_n_minutes is not None:
            due = due or time.monotonic() - self._last_save >= 60 * self.every_n_minutes
            due = bool(trainer.strategy.broadcast(due))  # every rank must take part in the save, or none
        folder = next(
            (c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None
        )
        if not due or folder is None or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        self.saved = Path(folder) / "mid-epoch.ckpt"
        trainer.save_checkpoint(self.saved)
        self._last_save = time.monotonic()
