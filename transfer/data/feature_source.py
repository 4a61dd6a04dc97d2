"""What feature extraction needs to know about one split, handed out by the data module.

The feature cache of the frozen epochs (``finetune.cache_features``) lives with training; it asks the data module
for a :class:`FeatureSource` per split and never reaches back into it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from transfer.data.batch import Batch
from transfer.data.datasets import ArrayImages, FileImages, TensorImages


@dataclass
class FeatureSource:
    """One split as feature extraction needs it
    (:meth:`~transfer.data.datamodule.ClassificationData.feature_source`).

    Attributes:
        dataset: the split's images, already cut to ``limit_*_batches``; keys the cache.
        batches: ``batches(augmented)`` yields the split's :class:`Batch` es on the model's device, in dataset
            order, with the training augmentation when ``augmented``.
        preprocess: the preprocessing (``Preprocess.to_dict()``); keys the cache.
        augment: the training augmentation; keys the cache of augmented views.
    """

    dataset: TensorImages | ArrayImages | FileImages
    batches: Callable[[bool], Iterable[Batch]]
    preprocess: dict[str, Any]
    augment: dict[str, Any]
