"""LightningDataModules: CIFAR-10 (held in memory) and a user's own image folders (read from disk).

Both hold a seeded, stratified validation split out of the training images, so model selection never looks
at the test set, and both take their normalisation and input size from the model (:meth:`configure`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from transfer.data.cifar import CIFAR10_CLASSES, ensure_cifar10, load_cifar10
from transfer.data.datasets import (ArrayImages, FileImages, list_classes, list_images, mixed_order, split_count,
                                    stratified_split)
from transfer.data.transforms import Preprocess, eval_transform, resolve_preprocess, train_transform
from transfer.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One loader process per core, at most 8: per-image PIL augmentation is the CPU-bound part of a step."""
    return min(8, os.cpu_count() or 1)


class ClassificationData(L.LightningDataModule):
    """Shared loaders, splits and transform plumbing; subclasses say where images come from.

    Args:
        root: dataset folder.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        num_workers: loader processes; ``None`` for :func:`default_workers`.
        image_size: side length fed to the model; ``None`` lets the model decide (see ``resolve_preprocess``).
        augment: the ``data.augment`` mapping.
        split_seed: seed of the validation (and test) hold-out.
    """

    native_size: int | None = None  # the dataset's own image size, when all images share one
    default_augment: dict[str, Any] = {}

    def __init__(self, root: str, batch_size: int = 64, eval_batch_size: int = 256, num_workers: int | None = None,
                 image_size: int | None = None, augment: Mapping[str, Any] | None = None, split_seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self.image_size = image_size
        self.augment = dict(self.default_augment if augment is None else augment)
        self.split_seed = int(split_seed)
        self.preprocess: Preprocess | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.source = ""

    @property
    def classes(self) -> list[str]:
        """Class names in label order (cheap: does not decode images)."""
        raise NotImplementedError

    def configure(self, meta: Any) -> Preprocess:
        """Take input size and normalisation from a model's :class:`~transfer.models.ModelMeta`."""
        self.preprocess = resolve_preprocess(meta, self.image_size, self.native_size)
        return self.preprocess

    def transforms(self) -> tuple[Any, Any]:
        """``(train, eval)`` transforms for the configured model."""
        if self.preprocess is None:
            raise RuntimeError("call configure(model.meta) before setup(): normalisation comes from the model")
        return train_transform(self.preprocess, self.augment), eval_transform(self.preprocess)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not run")
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=train and len(dataset) > self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def describe(self) -> dict[str, Any]:
        """Split sizes and origin, for the run summary."""
        return {"source": self.source, "classes": self.classes,
                **{f"{name}_size": len(ds) for name, ds in
                   (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)) if ds is not None}}


class CIFAR10Data(ClassificationData):
    """CIFAR-10 decoded once into memory (150 MB as uint8), 45k/5k train/val by default.

    Args:
        download: let torchvision download the archive into ``root`` when no local copy is found.
        val_size: images (>= 1) or fraction (< 1) of the 50k training set held out for validation.
        **kwargs: see :class:`ClassificationData`.
    """

    native_size = 32
    # The source material's augmentation (also in conf/data/cifar10.yaml).
    default_augment = {"crop_padding": 4, "hflip": True, "color_jitter": (0.2, 0.2, 0.2, 0.1), "rotation": 15}

    def __init__(self, root: str, download: bool = True, val_size: float = 5000, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.download, self.val_size = bool(download), val_size

    @property
    def classes(self) -> list[str]:
        train = self.root / "train"
        return list_classes(train) if train.is_dir() else list(CIFAR10_CLASSES)

    def prepare_data(self) -> None:
        # Runs on one process per node, before setup(): the only place a download may happen.
        ensure_cifar10(self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = load_cifar10(self.root)
        train_tf, eval_tf = self.transforms()
        count = split_count(self.val_size, len(data.train_targets), "data.val_size")
        keep, held = stratified_split(data.train_targets, count, self.split_seed)
        self.train_set = ArrayImages(data.train_images, data.train_targets, keep, train_tf)
        self.val_set = ArrayImages(data.train_images, data.train_targets, held, eval_tf)
        self.test_set = ArrayImages(data.test_images, data.test_targets,
                                    mixed_order(len(data.test_targets), self.split_seed), eval_tf)
        self.source = data.source


class ImageFolderData(ClassificationData):
    """A user's images: ``root/train/<class>/*`` plus optional ``val/`` (or ``validation/``) and ``test/``.

    Missing validation or test splits are held out of ``train``, stratified by class.

    Args:
        val_size: fraction (< 1) or count (>= 1) of train held out when there is no val folder.
        test_size: likewise when there is no test folder.
        **kwargs: see :class:`ClassificationData`.
    """

    default_augment = {"resized_crop_scale": (0.35, 1.0), "hflip": True, "color_jitter": (0.2, 0.2, 0.2, 0.1),
                       "rotation": 15}

    def __init__(self, root: str, val_size: float = 0.1, test_size: float = 0.1, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.val_size, self.test_size = val_size, test_size

    @property
    def classes(self) -> list[str]:
        train = self.root / "train"
        if not train.is_dir():
            raise DataNotFoundError(
                f"No training images at {train}. data=imagefolder expects data.root to hold train/<class>/<image> "
                f"(and optionally val/ and test/ with the same class folders); set data.root=/path/to/your/images.")
        classes = list_classes(train)
        if len(classes) < 2:
            raise ConfigError(f"{train} has {len(classes)} class folder(s); a classifier needs at least two.")
        return classes

    def _split_dir(self, *names: str) -> Path | None:
        return next((self.root / n for n in names if (self.root / n).is_dir()), None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        classes = self.classes
        files, targets = list_images(self.root / "train", classes)
        if not files:
            raise DataNotFoundError(f"{self.root / 'train'} holds no image files in its class folders.")
        train_tf, eval_tf = self.transforms()
        keep = list(range(len(files)))
        splits: dict[str, FileImages] = {}
        for name, size, folders in (("test", self.test_size, ("test",)), ("val", self.val_size, ("val", "validation"))):
            folder = self._split_dir(*folders)
            if folder is not None:
                split_files, split_targets = list_images(folder, classes)
                splits[name] = FileImages(split_files, split_targets, mixed_order(len(split_files), self.split_seed),
                                          eval_tf)
                continue
            sub_targets = [targets[i] for i in keep]
            # Fractions are of the whole train folder, so val_size=0.1 means 10% whether or not test exists.
            count = split_count(size, len(files), f"data.{name}_size")
            kept, held = stratified_split(sub_targets, min(count, len(keep) - 1), self.split_seed)
            splits[name] = FileImages(files, targets, [keep[i] for i in held], eval_tf)
            keep = [keep[i] for i in kept]
        self.train_set = FileImages(files, targets, keep, train_tf)
        self.val_set, self.test_set = splits["val"], splits["test"]
        self.source = f"image folders at {self.root}"
