"""Progressive resizing (fastai): train the early epochs at a lower resolution, the last ones at full size.

Early epochs mostly move the new head and the top of the backbone, which low-resolution images serve at a
fraction of the cost (a CNN's compute grows with the pixel count); the final epochs at full size close the
train/test resolution gap. Evaluation always runs at the model's full ``image_size``.
"""

from __future__ import annotations

import logging

import lightning as L

from transfer.core.errors import ConfigError

log = logging.getLogger(__name__)


class ProgressiveResize(L.Callback):
    """Grow the training image size linearly from ``start_size`` to the full size at ``full_at_epoch``.

    Works with the in-memory batched augmentation (``data.augment_on=device``), where the resize is part of
    the one warp every batch goes through anyway, so a new size per epoch costs nothing extra.

    Args:
        start_size: training side length in epoch 0.
        full_at_epoch: first epoch trained at the full ``image_size``.
        multiple: sizes are rounded to a multiple of this (8 keeps conv strides aligned).
    """

    def __init__(self, start_size: int, full_at_epoch: int, multiple: int = 8) -> None:
        if start_size < 8 or full_at_epoch < 1:
            raise ConfigError(
                f"callbacks.progressive_resize: start_size={start_size} must be >= 8 and "
                f"full_at_epoch={full_at_epoch} >= 1."
            )
        self.start_size, self.full_at_epoch, self.multiple = int(start_size), int(full_at_epoch), int(multiple)

    def size_at(self, epoch: int, full_size: int) -> int:
        """Training side length in ``epoch``."""
        if epoch >= self.full_at_epoch:
            return full_size
        size = self.start_size + (full_size - self.start_size) * epoch / self.full_at_epoch
        return min(full_size, max(self.multiple, int(round(size / self.multiple)) * self.multiple))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        pre = getattr(datamodule, "preprocess", None)
        if pre is None or getattr(datamodule, "augment_on", "device") != "device":
            raise ConfigError(
                "callbacks.progressive_resize needs data.augment_on=device (the batched path); remove "
                "it with ~callbacks.progressive_resize."
            )
        size = self.size_at(trainer.current_epoch, pre.image_size)
        datamodule.train_image_size = size if size != pre.image_size else None
        log.info("epoch %d: training at %d px", trainer.current_epoch, size)
