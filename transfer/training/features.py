"""The cached-feature frozen phase (``finetune.cache_features=true``).

While the backbone is frozen its output for an image never changes, so running it every epoch only repeats
work: here the backbone runs once over the training and validation images, the features are kept (in memory
and on disk), and the frozen epochs train the neck and head on them, a few seconds an epoch instead of a
full forward pass over the data. At the unfreeze epoch the loaders switch back to images.

:class:`CachedFeatureData` is how a run gets there (``transfer.training.train.build``): it wraps the run's data
module, whose part is only to describe each split (:meth:`~transfer.data.ClassificationData.feature_source`),
and serves the :class:`FeatureCache`'s loaders in the frozen epochs.

What changes against the uncached frozen phase: the backbone sees un-augmented images (or ``views`` fixed
augmented copies, cycled per epoch), and its BatchNorm statistics stay the pretrained ones until the
unfreeze (``finetune.bn=frozen`` behaviour; ``bn=train`` would let them drift with every batch).

The disk cache is keyed by everything the features depend on: model name and adaptation, a digest of the
backbone's weights and buffers, the preprocessing (size, mean, std, interpolation), the images and split,
and the augmentation of extra views, so changing any of them computes fresh features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from transfer.core.errors import ConfigError
from transfer.core.provenance import state_digest
from transfer.data import Batch, ClassificationData, FeatureSource
from transfer.data.cifar import cache_dir
from transfer.data.datasets import ArrayImages, FileImages, TensorImages, files_digest, keep_batch
from transfer.data.loader import ResumableLoader
from transfer.training.finetune import frozen_at
from transfer.training.module import Classifier

log = logging.getLogger(__name__)
FORMAT = 1  # bump when what is stored changes


def dataset_digest(dataset: Dataset) -> str:
    """What images, in which order, a split holds; the pixels themselves for in-memory data."""
    digest = hashlib.sha1()
    if isinstance(dataset, (TensorImages, ArrayImages)):
        digest.update(np.ascontiguousarray(dataset.images).data)
        digest.update(np.asarray(dataset.indices).tobytes())
    elif isinstance(dataset, FileImages):
        digest.update(files_digest([dataset.files[i] for i in dataset.indices]).encode())
    else:
        raise TypeError(f"cannot key features of a {type(dataset).__name__}")
    return digest.hexdigest()


def cache_key(
    backbone: nn.Module, meta: Any, preprocess: dict[str, Any], dataset: Dataset, views: int, augment: dict[str, Any]
) -> str:
    """The disk-cache key of one split's features (see the module docstring)."""
    parts = {
        "format": FORMAT,
        "model": meta.name,
        "adapt": meta.adapt,
        "weights": state_digest(backbone.state_dict()),
        "preprocess": preprocess,
        "data": dataset_digest(dataset),
        "views": views,
        "augment": augment if views > 1 else None,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureSet(Dataset):
    """Cached features of one split: ``(views, N, ...)`` float16 features and ``(N,)`` targets."""

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        self.features, self.targets, self.view = features, targets, 0

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitems__(self, items: list[int]) -> Batch:
        idx = torch.as_tensor(items)
        return Batch(self.features[self.view, idx].float(), self.targets[idx], features=True)


class FeatureCache:
    """Cached backbone features for the frozen epochs, served by :class:`CachedFeatureData`.

    Args:
        unfreeze_at_epoch: the finetuning's first unfrozen epoch (images again); ``None`` caches the whole run
            (a linear probe). Which epochs are frozen is :func:`transfer.training.finetune.frozen_at`, the rule the
            finetuning callback uses.
        views: feature copies of the training set: view 0 un-augmented, the others augmented; epoch ``e``
            uses view ``e % views``.
        root: cache folder; ``None`` for ``<decode cache>/features``.
    """

    def __init__(self, unfreeze_at_epoch: int | None, views: int = 1, root: str | Path | None = None) -> None:
        if views < 1:
            raise ConfigError(f"finetune.cache_views={views}: use 1 (un-augmented) or more (augmented copies).")
        self.unfreeze_at_epoch, self.views = unfreeze_at_epoch, int(views)
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.sets: dict[str, FeatureSet] = {}
        self.computed: list[str] = []  # splits whose features were computed, not loaded (for tests and logs)

    def serves(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on cached features (the backbone is frozen then)."""
        return frozen_at(epoch, self.unfreeze_at_epoch)

    def clear(self) -> None:
        """Give the features' memory back (the frozen phase is over)."""
        self.sets.clear()

    def loader(self, split: str, source: FeatureSource, trainer: L.Trainer, batch_size: int, train: bool) -> DataLoader:
        """A loader over ``split``'s cached features, computing or loading them on first use."""
        if split not in self.sets:
            self.sets[split] = self._load_or_compute(split, source, trainer)
        feats = self.sets[split]
        feats.view = trainer.current_epoch % feats.features.shape[0] if train else 0
        return ResumableLoader(
            feats,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and len(feats) > batch_size,
            collate_fn=keep_batch,
        )

    def _load_or_compute(self, split: str, source: FeatureSource, trainer: L.Trainer) -> FeatureSet:
        module = trainer.lightning_module
        if not isinstance(module, Classifier):
            raise TypeError(
                f"the feature cache needs a Classifier (its backbone and model), not {type(module).__name__}"
            )
        views = self.views if split == "train" else 1
        key = cache_key(module.backbone, module.model.meta, source.preprocess, source.dataset, views, source.augment)
        path = self.root / f"{split}-{key}.pt"
        if not path.is_file() and trainer.world_size > 1:
            # one rank computes, the others wait and read its file (or compute themselves without a shared disk)
            feats = self._compute(split, source, module, views) if trainer.is_global_zero else None
            if feats is not None:
                self._save(feats, path)
            trainer.strategy.barrier("feature_cache")
            if feats is not None:
                return feats  # rank 0 keeps what it computed rather than reading it back
        if path.is_file():
            stored = read_features(path, views, len(source.dataset), len(module.class_names))
            if stored is not None:
                log.info("%s features loaded from %s", split, path)
                return stored
        feats = self._compute(split, source, module, views)
        self._save(feats, path)
        return feats

    @torch.no_grad()
    def _compute(self, split: str, source: FeatureSource, module: Classifier, views: int) -> FeatureSet:
        backbone = module.backbone
        was_training = backbone.training
        backbone.eval()  # pretrained BatchNorm statistics, no dropout: the features a frozen backbone gives
        out: list[Tensor] = []
        targets: Tensor = torch.empty(0, dtype=torch.long)
        progress = _progress(module.trainer, len(source.dataset) * views, f"{split} features")
        try:
            for view in range(views):
                chunks, ys = [], []
                for batch in source.batches(view > 0):
                    with module.trainer.precision_plugin.forward_context():
                        chunks.append(backbone(batch.x).half().cpu())
                    ys.append(batch.y.cpu())
                    progress(len(batch.y))
                out.append(torch.cat(chunks))
                targets = torch.cat(ys)
        finally:
            backbone.train(was_training)
            progress(None)
        self.computed.append(split)
        log.info("%s features computed: %d views x %s", split, views, tuple(out[0].shape))
        return FeatureSet(torch.stack(out), targets)

    @staticmethod
    def _save(feats: FeatureSet, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"features": feats.features, "targets": feats.targets}, tmp)
            tmp.replace(path)
        except OSError as err:
            log.warning("could not write feature cache %s (%s); the next run computes them again", path, err)


def read_features(path: Path, views: int, count: int, classes: int) -> FeatureSet | None:
    """A feature-cache file's features, or ``None`` when it cannot be used: then it is removed, with one warning
    line, and the caller computes the features again (a cache is never fatal).

    Read with ``weights_only=True``, so the file cannot run code; what it holds must be what
    :meth:`FeatureCache._save` writes for this split: ``(views, count, ...)`` float16 features and ``(count,)``
    integer targets below ``classes``.
    """
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        problem = _features_problem(stored, views, count, classes)
    except Exception as err:  # UnpicklingError (random bytes), RuntimeError/EOFError (truncated), ...
        stored, problem = None, f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    if problem is None:
        return FeatureSet(stored["features"], stored["targets"])
    log.warning("discarding feature cache %s (%s); computing the features again", path, problem)
    with contextlib.suppress(OSError):  # a read-only cache folder: the rebuilt file is not written either
        path.unlink(missing_ok=True)
    return None


def _features_problem(stored: Any, views: int, count: int, classes: int) -> str | None:
    """What is wrong with a loaded feature-cache entry, or ``None``."""
    if not isinstance(stored, dict) or not {"features", "targets"} <= set(stored):
        return "not a features/targets record"
    feats, targets = stored["features"], stored["targets"]
    if not isinstance(feats, Tensor) or feats.dtype != torch.float16 or feats.ndim < 3:
        return "features are not a (views, N, ...) float16 tensor"
    if tuple(feats.shape[:2]) != (views, count):
        return f"features of shape {tuple(feats.shape)} for {views} view(s) of {count} images"
    if not isinstance(targets, Tensor) or targets.dtype != torch.long or tuple(targets.shape) != (count,):
        return f"targets are not {count} class indices"
    if count and not (int(targets.min()) >= 0 and int(targets.max()) < classes):
        return f"targets outside 0..{classes - 1}"
    return None


def _progress(trainer: L.Trainer, total: int, what: str) -> Callable[[int | None], None]:
    """A tqdm bar (when the run shows progress bars) fed ``update(n)``; ``update(None)`` closes it.

    Extracting 50k images' features takes minutes on a CPU: without a bar the run looks hung.
    """
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=what, unit="img", leave=False, dynamic_ncols=True)
    return lambda n: bar.close() if n is None else bar.update(n)


class CachedFeatureData(L.LightningDataModule):
    """A run's data module whose frozen epochs train on cached features (``finetune.cache_features``).

    The training and validation loaders are the cache's while :meth:`FeatureCache.serves` the current epoch,
    the wrapped data module's otherwise; the trainer needs ``reload_dataloaders_every_n_epochs=1`` to switch at
    the unfreeze epoch (``transfer.training.train.build_trainer`` sets it). Every other hook, the hyperparameters
    and every attribute this class lacks (``classes``, ``describe()``, ``preprocess``, ``batch_size``,
    ``prepare_batch``, ``set_train_size``, ...) are the wrapped data module's. The features' memory goes back
    when fitting ends.

    Args:
        data: the run's data module.
        cache: the features of the frozen epochs.
    """

    def __init__(self, data: ClassificationData, cache: FeatureCache) -> None:
        self.data = data  # first: the base class's __init__ sets the trainer, which lives on the data module
        super().__init__()
        self.cache = cache
        self.prepare_data_per_node = data.prepare_data_per_node

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class lacks; "data" itself is missing only while __init__ or unpickling runs.
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    @property
    def trainer(self) -> L.Trainer | None:
        """The trainer, shared with the wrapped data module (its hooks and ``feature_source`` read it)."""
        return self.data.trainer

    @trainer.setter
    def trainer(self, trainer: L.Trainer | None) -> None:
        self.data.trainer = trainer

    @property
    def hparams(self) -> AttributeDict | MutableMapping:
        """The wrapped data module's hyperparameters: loggers and checkpoints record those."""
        return self.data.hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        """The wrapped data module's initial hyperparameters."""
        return self.data.hparams_initial

    def _features(self, split: str, batch_size: int, train: bool) -> DataLoader | None:
        """The cache's loader over ``split`` when the current epoch trains on features, else ``None``."""
        trainer = self.trainer
        if trainer is None or not self.cache.serves(trainer.current_epoch):
            return None
        return self.cache.loader(split, self.data.feature_source(split), trainer, batch_size, train=train)

    def train_dataloader(self) -> DataLoader:
        features = self._features("train", self.data.batch_size, train=True)
        return self.data.train_dataloader() if features is None else features

    def val_dataloader(self) -> DataLoader:
        features = self._features("val", self.data.eval_batch_size, train=False)
        return self.data.val_dataloader() if features is None else features

    def test_dataloader(self) -> DataLoader:
        return self.data.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.data.predict_dataloader()

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.setup(stage)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.cache.clear()  # the features' memory goes back once fitting is over
        self.data.teardown(stage)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        return self.data.on_after_batch_transfer(batch, dataloader_idx)

    def on_exception(self, exception: BaseException) -> None:
        self.data.on_exception(exception)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data.load_state_dict(state_dict)
