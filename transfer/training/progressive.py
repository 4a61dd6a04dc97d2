"""Progressive resizing (fastai): train the early epochs at a lower resolution, the last ones at full size.

Early epochs mostly move the new head and the top of the backbone, which low-resolution images serve at a
fraction of the cost (a CNN's compute grows with the pixel count); the final epochs at full size close the
train/test resolution gap. Evaluation always runs at the model's full ``image_size``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from transfer.core.errors import ConfigError

log = logging.getLogger(__name__)
LEVER = "callbacks.progressive_resize"


class ProgressiveResize(L.Callback):
    """Grow the training image size linearly from ``start_size`` to the full size at ``full_at_epoch``.

    Works with the in-memory batched augmentation (``data.augment_on=device``), where the resize is part of
    the one warp every batch goes through anyway, so a new size per epoch costs nothing extra. The size goes to
    the data module's ``set_train_size`` at the start of every training epoch. At fit start the callback
    refuses settings where it cannot act: a start size that shrinks nothing, a schedule that never reaches the
    full size within ``trainer.max_epochs``, and data whose batches bypass the batched augmentation.

    Args:
        start_size: training side length in epoch 0.
        full_at_epoch: first epoch trained at the full ``image_size`` (epochs count from 0).
        multiple: sizes are rounded to a multiple of this (8 keeps conv strides aligned).
    """

    def __init__(self, start_size: int, full_at_epoch: int, multiple: int = 8) -> None:
        if start_size < 8 or full_at_epoch < 1:
            raise ConfigError(f"{LEVER}: start_size={start_size} must be >= 8 and full_at_epoch={full_at_epoch} >= 1.")
        self.start_size, self.full_at_epoch, self.multiple = int(start_size), int(full_at_epoch), int(multiple)

    def size_at(self, epoch: int, full_size: int) -> int:
        """Training side length in ``epoch``."""
        if epoch >= self.full_at_epoch:
            return full_size
        size = self.start_size + (full_size - self.start_size) * epoch / self.full_at_epoch
        return min(full_size, max(self.multiple, round(size / self.multiple) * self.multiple))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, in one paragraph, settings under which resizing would not act (the data is set up by now)."""
        datamodule = _datamodule(trainer)
        full = datamodule.preprocess.image_size
        found = []
        if self.start_size >= full:
            found.append(
                f"start_size={self.start_size} is not below the model's image_size={full}, so no epoch would "
                f"train smaller (pass a smaller {LEVER}.start_size)"
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.full_at_epoch > max_epochs - 1:
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
        datamodule = _datamodule(trainer)
        full = datamodule.preprocess.image_size
        size = self.size_at(trainer.current_epoch, full)
        datamodule.set_train_size(size if size != full else None)
        log.info("epoch %d: training at %d px", trainer.current_epoch + 1, size)  # numbered from 1, as the log is


def _datamodule(trainer: L.Trainer) -> Any:
    """The trainer's data module, which must offer ``set_train_size`` (``transfer.data``'s data modules do)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "set_train_size") or datamodule.preprocess is None:
        raise ConfigError(
            f"{LEVER} needs one of transfer.data's data modules, built with the model's preprocessing (it calls "
            f"their set_train_size); fit with datamodule=, or remove it with ~{LEVER}."
        )
    return datamodule
