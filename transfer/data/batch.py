"""The one batch type every training, validation and test step and every callback sees.

Loaders yield what their datasets give (uint8 images, float images, cached features); the data module's
``on_after_batch_transfer`` turns each into a :class:`Batch` on the device, so the steps, the feature cache,
``History`` and the TensorBoard extras read ``batch.x``/``batch.y``/``batch.features`` instead of guessing
from the batch's shape whether it is a tuple or a dict.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """A batch ready for the model.

    Attributes:
        x: normalised images ``(N, 3, H, W)``, or, when ``features``, the frozen backbone's output for them.
        y: class indices ``(N,)``, or class probabilities ``(N, C)`` after MixUp/CutMix.
        features: ``x`` holds cached backbone features (``finetune.cache_features``): only neck and head run.
    """

    x: Tensor
    y: Tensor
    features: bool = False


def as_batch(batch: Batch | tuple | list) -> Batch:
    """``batch`` as a :class:`Batch`: an ``(images, targets)`` pair from a plain DataLoader (no data module to
    prepare it, e.g. a user's own loader passed to ``Trainer.fit``) is taken as ready images."""
    return batch if isinstance(batch, Batch) else Batch(batch[0], batch[1])
