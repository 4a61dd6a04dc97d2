"""Data: LightningDataModules for CIFAR-10 and image folders, transforms resolved from the model."""

from transfer.data.batch import Batch
from transfer.data.cifar import CIFAR10_CLASSES, ensure_cifar10, load_cifar10
from transfer.data.datamodule import CIFAR10Data, ClassificationData, ImageFolderData, datamodule_from_config
from transfer.data.datasets import stratified_split
from transfer.data.feature_source import FeatureSource
from transfer.data.transforms import eval_transform, train_transform

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
