"""Data: LightningDataModules for CIFAR-10 and image folders, transforms resolved from the model.

The names below are imported on first use (PEP 562), so a command that only checks a folder's layout
(``transfer.data.folders``, ``transfer.data.cifar``) does not import Lightning and torchvision first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transfer.data.batch import Batch
    from transfer.data.cifar import CIFAR10_CLASSES, ensure_cifar10, load_cifar10
    from transfer.data.datamodule import CIFAR10Data, ClassificationData, datamodule_from_config
    from transfer.data.datasets import stratified_split
    from transfer.data.feature_source import FeatureSource
    from transfer.data.image_folder import ImageFolderData
    from transfer.data.transforms import eval_transform, train_transform

_WHERE = {
    "Batch": "batch",
    "CIFAR10_CLASSES": "cifar",
    "ensure_cifar10": "cifar",
    "load_cifar10": "cifar",
    "CIFAR10Data": "datamodule",
    "ClassificationData": "datamodule",
    "ImageFolderData": "image_folder",
    "datamodule_from_config": "datamodule",
    "stratified_split": "datasets",
    "FeatureSource": "feature_source",
    "eval_transform": "transforms",
    "train_transform": "transforms",
}
__all__ = [
    "CIFAR10_CLASSES",
    "Batch",
    "CIFAR10Data",
    "ClassificationData",
    "FeatureSource",
    "ImageFolderData",
    "datamodule_from_config",
    "ensure_cifar10",
    "eval_transform",
    "load_cifar10",
    "stratified_split",
    "train_transform",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
