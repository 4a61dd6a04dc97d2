"""Progressive resizing (fastai): train the early epochs at a lower resolution, the last ones at full size.

Early epochs mostly move the new head and the top of the backbone, which low-resolution images serve at a
fraction of the cost (a CNN's compute grows with the pixel count); the final epochs at full size close the
train/test resolution gap. Evaluation always runs at the model's full ``image_size``.

Under ``budget=`` the number of epochs is the planner's output, not a setting, so the size grows with the plan's
progress instead (the share of the planned steps trained): full at ``budget_full_at`` of them. The callback gives
the planner each step's cost relative to a step at the full size (the pixel count's share), so the plan sizes
its length by what the steps ahead will cost, and its re-plans time the steps trained in steps at the full size.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np

from transfer.core.errors import ConfigError
from transfer.training.budget import BudgetPlanner

log = logging.getLogger(__name__)
LEVER = "callbacks.progressive_resize"


class ProgressiveResize(L.Callback):
    """Grow the training image size linearly from ``start_size`` to the full size at ``full_at_epoch`` (under a
    budget: at ``budget_full_at`` of the planned steps).

    Works with the in-memory batched augmentation (``data.augment_on=device``), where the resize is part of
    the one warp every batch goes through anyway, so a new size per epoch costs nothing extra. The size goes to
    the data module's ``set_train_size`` at the start of every training epoch. At fit start the callback
    refuses settings where it cannot act: a start size that shrinks nothing, a schedule that never reaches the
    full size within ``trainer.max_epochs``, and data whose batches bypass the batched augmentation.

    Args:
        start_size: training side length in epoch 0.
        full_at_epoch: first epoch trained at the full ``image_size`` (epochs count from 0).
        multiple: sizes are rounded to a multiple of this (8 keeps conv strides aligned).
        budget_full_at: under ``budget=``, the share of the planned steps (0 to 1) from which training runs at the
            full size; ``full_at_epoch`` is not used there.
    """

    def __init__(self, start_size: int, full_at_epoch: int, multiple: int = 8, budget_full_at: float = 0.5) -> None:
        if start_size < 8 or full_at_epoch < 1 or not 0 < budget_full_at <= 1:
            raise ConfigError(
                f"{LEVER}: start_size={start_size} must be >= 8, full_at_epoch={full_at_epoch} >= 1 and "
                f"budget_full_at={budget_full_at} in (0, 1]."
            )
        self.start_size, self.full_at_epoch, self.multiple = int(start_size), int(full_at_epoch), int(multiple)
        self.budget_full_at = float(budget_full_at)
        self._planner: BudgetPlanner | None = None
        self._size: int | None = None
        self._full = 0
        self._costs: dict[int, float] = {}  # under a budget: step -> its relative cost, as trained

    def size_at(self, epoch: int, full_size: int) -> int:
        """Training side length in ``epoch``."""
        return self._grown(epoch / self.full_at_epoch, full_size)

    def size_at_progress(self, progress: float, full_size: int) -> int:
        """Training side length once ``progress`` (0 to 1) of a budget's planned steps are trained."""
        return self._grown(progress / self.budget_full_at, full_size)

    def _grown(self, fraction: float, full_size: int) -> int:
        """The side ``fraction`` of the way from the start size to the full one, rounded to the multiple."""
        return int(self._grown_sizes(np.asarray([fraction]), full_size)[0])

    def _grown_sizes(self, fractions: np.ndarray, full_size: int) -> np.ndarray:
        """:meth:`_grown` of every fraction at once (the planner sums the sizes of thousands of steps)."""
        grown = np.round((self.start_size + (full_size - self.start_size) * fractions) / self.multiple) * self.multiple
        return np.where(fractions >= 1, full_size, np.clip(grown, self.multiple, full_size))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, in one paragraph, settings under which resizing would not act (the data is set up by now)."""
        datamodule = _datamodule(trainer)
        full = datamodule.preprocess.image_size
        # trainer.callbacks is assigned by Lightning's callback connector, so its type is not declared
        callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        self._planner, self._size = next((cb for cb in callbacks if isinstance(cb, BudgetPlanner)), None), None
        self._full, self._costs = full, {}
        if self._planner is not None:
            self._planner.step_cost = self
        found = []
        if self.start_size >= full:
            found.append(
                f"start_size={self.start_size} is not below the model's image_size={full}, so no epoch would "
                f"train smaller (pass a smaller {LEVER}.start_size)"
            )
        max_epochs = trainer.max_epochs
        budgeted = self._planner is not None  # the plan sets the length: the size follows its progress
        if not budgeted and max_epochs is not None and max_epochs >= 0 and self.full_at_epoch > max_epochs - 1:
            found.append(
                f"full_at_epoch={self.full_at_epoch} is not below trainer.max_epochs={max_epochs} (epochs count "
                f"from 0), so training would never reach the {full} px it is tested at (pass {LEVER}.full_at_epoch="
                f"{max(1, max_epochs - 1)} or more epochs)"
            )
        if not datamodule.batched_augment:
            found.append(
                f"the training batches bypass the batched augmentation ({datamodule.source}, data.augment_on="
                f"{datamodule.augment_on}: PIL-augmented or streamed images arrive at their final size), so pass "
                f"data.augment_on=device, for image folders with a data.memory_limit_gb they fit in"
            )
        if found:
            raise ConfigError(
                f"{LEVER} cannot act: {'; '.join(found)}. Or remove it with ~{LEVER} (or callbacks=default)."
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._planner is not None:
            self._follow_plan(trainer)
            return
        datamodule = _datamodule(trainer)
        full = datamodule.preprocess.image_size
        size = self.size_at(trainer.current_epoch, full)
        datamodule.set_train_size(size if size != full else None)
        log.info("epoch %d: training at %d px", trainer.current_epoch + 1, size)  # numbered from 1, as the log is

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The next batch is augmented (at the size set now) before the next batch-start hook runs.
        if self._planner is not None:
            self._costs[trainer.global_step - 1] = self._cost(self._size or self._full)
            self._follow_plan(trainer)

    def _cost(self, size: int) -> float:
        """A step's cost at ``size`` relative to one at the full size: its share of the pixels."""
        return (size / self._full) ** 2

    def trained(self, start: int, end: int) -> float:
        """Summed relative cost of the steps ``start`` to ``end - 1`` as trained (a step of an earlier run: 1)."""
        return sum(self._costs.get(step, 1.0) for step in range(start, end))

    def ahead(self, done: int, planned: int) -> float:
        """Summed relative cost of the steps ``done`` to ``planned - 1`` under a plan of ``planned`` steps (as
        :meth:`size_at_progress` sizes them, in one pass over the steps: the planner asks for a few lengths)."""
        sizes = self._grown_sizes(np.arange(done, planned) / planned / self.budget_full_at, self._full)
        return float(((np.maximum(sizes, self._size or 0) / self._full) ** 2).sum())

    def _follow_plan(self, trainer: L.Trainer) -> None:
        """Under a budget: the size for the coming step, from the share of the planned steps trained (the start
        size until the probe has planned)."""
        assert self._planner is not None
        plan = self._planner.plan
        progress = trainer.global_step / plan.planned_steps if plan is not None else 0.0
        # never smaller again: a re-plan that adds steps (a faster stretch) lowers the share trained
        size = max(self.size_at_progress(progress, self._full), self._size or 0)
        if size != self._size:
            _datamodule(trainer).set_train_size(size if size != self._full else None)
            log.info("step %d (%.0f%% of the plan): training at %d px", trainer.global_step, 100 * progress, size)
            self._size = size


def _datamodule(trainer: L.Trainer) -> Any:
    """The trainer's data module, which must offer ``set_train_size`` (``transfer.data``'s data modules do)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "set_train_size") or datamodule.preprocess is None:
        raise ConfigError(
            f"{LEVER} needs one of transfer.data's data modules, built with the model's preprocessing (it calls "
            f"their set_train_size); fit with datamodule=, or remove it with ~{LEVER}."
        )
    return datamodule
