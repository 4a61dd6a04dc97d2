"""LightningDataModules: what every data module shares, and CIFAR-10 (held in memory); a user's own image folders
are in :mod:`transfer.data.image_folder`.

Each holds a seeded, stratified validation split out of the training images, so model selection never looks at
the test set (unless ``train_on_val`` gives those images to training; the run then tests its final weights).
Their normalisation and input size come from the model's weights and are handed to the constructor
(``transfer.models.model_preprocess``); a data module never learns about the model afterwards. Training drives
them through two public methods only: :meth:`ClassificationData.feature_source` describes a split for the feature
cache of the frozen epochs (``finetune.cache_features``, which wraps the data module and serves the cached
features itself), and :meth:`ClassificationData.set_train_size` sets the batched augmentation's output size for
progressive resizing.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from transfer.core.errors import ConfigError, TransferError
from transfer.core.preprocess import Preprocess
from transfer.data.batch import Batch
from transfer.data.batch_augment import BatchAugment
from transfer.data.cifar import CIFAR10_CLASSES, ensure_cifar10, load_cifar10
from transfer.data.datasets import (
    ArrayImages,
    FileImages,
    TensorImages,
    keep_batch,
    list_classes,
    mixed_order,
    split_count,
    stratified_split,
)
from transfer.data.feature_source import FeatureSource
from transfer.data.loader import ResumableLoader
from transfer.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


AUGMENT_ON = ("device", "cpu_pil")
Images = TensorImages | ArrayImages | FileImages  # what a split holds: uint8 in memory, PIL from memory or disk


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
        preprocess: input size and normalisation, from the model's weights (``transfer.models.model_preprocess``;
            a :class:`Preprocess` or its ``to_dict()``). Only ``classes`` works without it.
        augment: the ``data.augment`` mapping.
        split_seed: seed of the validation (and test) hold-out.
        augment_on: ``device`` holds uint8 images in memory and augments whole batches on the training device
            (:class:`~transfer.data.batch_augment.BatchAugment`); ``cpu_pil`` runs the per-image PIL transforms
            in loader workers (any torchvision transform can be added there).
        predict_split: the split ``Trainer.predict`` runs over (``test`` or ``val``; ``transfer.evaluate``).
        train_on_val: the validation images train too (the held-out share, or the ``val/`` folder), so none are
            left to validate on: the run tests its final weights (``data.train_on_val``).
    """

    native_size: int | None = None  # the dataset's own image size, when all images share one
    default_augment: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int | None = None,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        split_seed: int = 0,
        augment_on: str = "device",
        predict_split: str = "test",
        train_on_val: bool = False,
    ) -> None:
        super().__init__()
        if augment_on not in AUGMENT_ON:
            raise ConfigError(f"data.augment_on={augment_on!r} is not one of {AUGMENT_ON}.")
        if predict_split not in ("test", "val"):
            raise ConfigError(f"split={predict_split!r}: use test or val.")
        if predict_split == "val" and train_on_val:
            raise ConfigError(
                "split=val: this model trained on its validation images (data.train_on_val=true), so it has no "
                "validation split to score; evaluate split=test."
            )
        self.train_on_val = bool(train_on_val)
        self.predict_split = predict_split
        self.augment_on = augment_on
        self.preprocess = Preprocess.from_dict(preprocess) if isinstance(preprocess, Mapping) else preprocess
        # The checkpoint records what the data was built with; objects stay out (a checkpoint holds no code).
        self.save_hyperparameters(ignore=["preprocess"])
        self.hparams["preprocess"] = self.preprocess.to_dict() if self.preprocess else None
        self.batch_augment: BatchAugment | None = None
        self.root = Path(root).expanduser()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self.augment = dict(self.default_augment if augment is None else augment)
        self.split_seed = int(split_seed)
        self.train_set: Images | None = None
        self.val_set: Images | None = None
        self.test_set: Images | None = None
        self.source = ""

    @property
    def classes(self) -> list[str]:
        """Class names in label order (cheap: does not decode images)."""
        raise NotImplementedError

    def _preprocess(self) -> Preprocess:
        if self.preprocess is None:
            raise RuntimeError(
                f"{type(self).__name__} was built without preprocess=: the input size and "
                f"normalisation come from the model (transfer.models.model_preprocess)"
            )
        return self.preprocess

    def transforms(self) -> tuple[Any, Any]:
        """``(train, eval)`` transforms for the model's preprocessing."""
        pre = self._preprocess()
        return train_transform(pre, self.augment), eval_transform(pre)

    def _loader(self, dataset: Images | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not run")
        # In-memory uint8 batches are one indexing copy each: worker processes would only add IPC.
        in_memory = isinstance(dataset, TensorImages)
        workers = 0 if in_memory else self.num_workers
        return ResumableLoader(  # its epoch order and position survive a resume inside an epoch
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=keep_batch if in_memory else None,
        )

    def _batch_augment(self) -> BatchAugment:
        if self.batch_augment is None:
            self.batch_augment = BatchAugment(self._preprocess(), self.augment)
        return self.batch_augment

    @property
    def batched_augment(self) -> bool:
        """Whether training batches go through the batched augmentation (:meth:`prepare_batch`), so that
        :meth:`set_train_size` acts: in-memory uint8 images (``augment_on=device`` and, for image folders, within
        ``memory_limit_gb``). Known after :meth:`setup`."""
        if self.train_set is None:
            raise RuntimeError("setup() has not run")
        return isinstance(self.train_set, TensorImages)

    def set_train_size(self, size: int | None) -> None:
        """Set the batched augmentation's output size for the coming training batches (progressive resizing).

        Evaluation keeps the model's ``image_size``. Only the batched path resizes (:attr:`batched_augment`):
        PIL-augmented and streamed batches arrive at their final size and are not changed.

        Args:
            size: side length in px; ``None`` for the model's ``image_size``.
        """
        if size is not None and int(size) < 1:
            raise ValueError(f"set_train_size({size}): a side length must be positive")
        self._batch_augment().train_size = None if size is None else int(size)

    def prepare_batch(self, batch: Any, train: bool) -> Batch:
        """Turn a loader's batch into the :class:`Batch` the model takes, on the batch's device.

        uint8 in-memory images are augmented (when ``train``) and normalised here; float images from the PIL
        path and cached features pass through. Lightning calls this after moving the batch to the device;
        loops outside a Trainer call it themselves.
        """
        if isinstance(batch, Batch):
            return batch
        x, y = batch[0], batch[1]
        if x.dtype != torch.uint8:
            return Batch(x, y)
        augment = self._batch_augment()
        if augment.mean.device != x.device:
            augment.to(x.device)
        return Batch(augment(x, train=train), y)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        trainer = self.trainer
        return self.prepare_batch(batch, train=bool(trainer is not None and trainer.training))

    def _images(self, images: Any, targets: Any, indices: Any, transform: Any) -> TensorImages | ArrayImages:
        """An in-memory split for the configured augmentation path."""
        if self.augment_on == "device":
            return TensorImages(images, targets, indices)
        return ArrayImages(images, targets, indices, transform)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.train_on_val:
            raise ConfigError(
                "There is no validation split to load: data.train_on_val=true gave its images to training. A "
                "Trainer over this data module validates nothing (limit_val_batches=0), as transfer.run's does."
            )
        return self._loader(self.val_set, train=False)

    def feature_source(self, split: str) -> FeatureSource:
        """``split``'s images for feature extraction: in dataset order, cut to the trainer's ``limit_*_batches``.

        Args:
            split: ``train`` or ``val``.

        Returns:
            What the feature cache (``finetune.cache_features``) computes, or finds, the split's features from.
        """
        dataset = self._limited(getattr(self, f"{split}_set"), split)
        device = self.trainer.lightning_module.device if self.trainer is not None else torch.device("cpu")

        def batches(augmented: bool) -> Iterator[Batch]:
            view = dataset
            if isinstance(dataset, (ArrayImages, FileImages)):
                train_tf, eval_tf = self.transforms()
                with_transform = copy.copy(dataset)
                with_transform.transform = train_tf if augmented else eval_tf
                view = with_transform
            for batch in self._loader(view, train=False):
                yield self.prepare_batch((batch[0].to(device), batch[1].to(device)), train=augmented)

        return FeatureSource(dataset, batches, self._preprocess().to_dict(), self.augment)

    def _limited(self, dataset: Images | None, split: str) -> Images:
        """``dataset`` cut to what ``limit_<split>_batches=<count>`` lets an epoch see: the first batches of val,
        a seeded subset spread over train (the first images of a class-sorted split would be one class).

        A fraction keeps the whole split: Lightning applies it again to the feature loader, and for training it
        takes that fraction of freshly shuffled batches every epoch, so any image may be needed.
        """
        if dataset is None:
            raise RuntimeError("setup() has not run")
        limit = getattr(self.trainer, f"limit_{split}_batches", 1.0) if self.trainer is not None else 1.0
        size = len(dataset)
        if isinstance(limit, float):
            return dataset
        keep = int(limit) * (self.batch_size if split == "train" else self.eval_batch_size)
        if keep >= size:
            return dataset
        limited = copy.copy(dataset)
        # val: its first batches, exactly what an uncached epoch validates on; train: a spread (it is shuffled)
        chosen = (
            np.arange(keep)
            if split == "val"
            else np.sort(np.random.default_rng(self.split_seed).permutation(size)[:keep])
        )
        limited.indices = dataset.indices[chosen]
        return limited

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(getattr(self, f"{self.predict_split}_set"), train=False)

    def describe(self) -> dict[str, Any]:
        """Split sizes and origin, for the run summary."""
        return {
            "source": self.source,
            "classes": self.classes,
            "train_on_val": self.train_on_val,
            **{
                f"{name}_size": len(ds)
                for name, ds in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set))
                if ds is not None
            },
        }


class CIFAR10Data(ClassificationData):
    """CIFAR-10 decoded once into memory (150 MB as uint8), 45k/5k train/val by default (50k/none with
    ``train_on_val``).

    Args:
        download: let torchvision download the archive into ``root`` when no local copy is found.
        val_size: images (>= 1) or fraction (< 1) of the 50k training set held out for validation.
        **kwargs: see :class:`ClassificationData`.
    """

    native_size = 32
    # The classic CIFAR recipe's augmentation, used when no augment= is passed. A run always passes data.augment:
    # conf/data/cifar10.yaml keeps only crop and flip, and the source recipe is set again, these same values, by
    # conf/experiment/seed_resnet18.yaml (which conf/experiment/seed_alexnet.yaml builds on).
    default_augment: ClassVar[dict[str, Any]] = {
        "crop_padding": 4,
        "hflip": True,
        "color_jitter": (0.2, 0.2, 0.2, 0.1),
        "rotation": 15,
    }

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
        count = 0 if self.train_on_val else split_count(self.val_size, len(data.train_targets), "data.val_size")
        keep, held = stratified_split(data.train_targets, count, self.split_seed)
        self.train_set = self._images(data.train_images, data.train_targets, keep, train_tf)
        self.val_set = self._images(data.train_images, data.train_targets, held, eval_tf) if count else None
        self.test_set = self._images(
            data.test_images, data.test_targets, mixed_order(len(data.test_targets), self.split_seed), eval_tf
        )
        self.source = data.source


def datamodule_from_config(node: Any, preprocess: Preprocess | None, **kwargs: Any) -> ClassificationData:
    """Instantiate the ``data`` config group with the model's preprocessing.

    ``data.image_size`` is not passed on: it is a request to the model, already resolved into ``preprocess``
    (``transfer.models.model_preprocess``).

    Args:
        node: the ``data`` group (``_target_`` plus constructor arguments).
        preprocess: from the model's weights; ``None`` when only ``classes`` is needed.
        **kwargs: further constructor arguments (e.g. ``predict_split``, ``eval_batch_size``).

    Returns:
        The data module.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(node, resolve=True)
    if not isinstance(container, dict):
        raise ConfigError(f"The data config must be a mapping with a _target_, got {container!r}.")
    args = {k: v for k, v in container.items() if k != "image_size"}
    try:
        return instantiate(args, preprocess=preprocess, **kwargs, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, TransferError):  # the constructor's own one-paragraph refusal, unwrapped
            raise err.__cause__ from None
        raise
