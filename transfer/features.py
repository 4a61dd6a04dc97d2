"""The cached-feature frozen phase (``finetune.cache_features=true``).

While the backbone is frozen its output for an image never changes, so running it every epoch only repeats
work: here the backbone runs once over the training and validation images, the features are kept (in memory
and on disk), and the frozen epochs train the neck and head on them, a few seconds an epoch instead of a
full forward pass over the data. At the unfreeze epoch the loaders switch back to images.

What changes against the uncached frozen phase: the backbone sees un-augmented images (or ``views`` fixed
augmented copies, cycled per epoch), and its BatchNorm statistics stay the pretrained ones until the
unfreeze (``finetune.bn=frozen`` behaviour; ``bn=train`` would let them drift with every batch).

The disk cache is keyed by everything the features depend on: model name and adaptation, a digest of the
backbone's weights and buffers, the preprocessing (size, mean, std, interpolation), the images and split,
and the augmentation of extra views, so changing any of them computes fresh features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from transfer.data.cifar import cache_dir
from transfer.data.datasets import ArrayImages, FileImages, TensorImages, files_digest, keep_batch
from transfer.errors import ConfigError
from transfer.provenance import state_digest

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


def cache_key(backbone: nn.Module, meta: Any, preprocess: Any, dataset: Dataset, views: int,
              augment: dict[str, Any]) -> str:
    """The disk-cache key of one split's features (see the module docstring)."""
    parts = {"format": FORMAT, "model": meta.name, "adapt": meta.adapt, "weights": state_digest(backbone.state_dict()),
             "preprocess": preprocess.to_dict(), "data": dataset_digest(dataset), "views": views,
             "augment": augment if views > 1 else None}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureSet(Dataset):
    """Cached features of one split: ``(views, N, ...)`` float16 features and ``(N,)`` targets.

    Batches are dicts (``{"features", "target"}``), which is how the classifier tells them from images.
    """

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        self.features, self.targets, self.view = features, targets, 0

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitems__(self, items: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(items)
        return {"features": self.features[self.view, idx].float(), "target": self.targets[idx]}


class FeatureCache(L.Callback):
    """Serve cached backbone features while the backbone is frozen.

    Args:
        until_epoch: first epoch with the backbone unfrozen (images again); ``None`` caches the whole run
            (a linear probe).
        views: feature copies of the training set: view 0 un-augmented, the others augmented; epoch ``e``
            uses view ``e % views``.
        root: cache folder; ``None`` for ``<decode cache>/features``.
    """

    def __init__(self, until_epoch: int | None, views: int = 1, root: str | Path | None = None) -> None:
        if views < 1:
            raise ConfigError(f"finetune.cache_views={views}: use 1 (un-augmented) or more (augmented copies).")
        self.until_epoch, self.views = until_epoch, int(views)
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.sets: dict[str, FeatureSet] = {}
        self.computed: list[str] = []  # splits whose features were computed, not loaded (for tests and logs)

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on cached features."""
        return self.until_epoch is None or epoch < self.until_epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.datamodule is not None:
            trainer.datamodule.feature_cache = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.datamodule is not None:
            trainer.datamodule.feature_cache = None
        self.sets.clear()  # the memory goes back once the frozen phase is over

    def loader(self, split: str, datamodule: Any, batch_size: int, train: bool) -> DataLoader:
        """A loader over ``split``'s cached features, computing or loading them on first use."""
        trainer = datamodule.trainer
        if split not in self.sets:
            self.sets[split] = self._load_or_compute(split, datamodule, trainer)
        feats = self.sets[split]
        feats.view = trainer.current_epoch % feats.features.shape[0] if train else 0
        return DataLoader(feats, batch_size=batch_size, shuffle=train, drop_last=train and len(feats) > batch_size,
                          collate_fn=keep_batch)

    def _load_or_compute(self, split: str, datamodule: Any, trainer: L.Trainer) -> FeatureSet:
        module = trainer.lightning_module
        dataset = getattr(datamodule, f"{split}_set")
        views = self.views if split == "train" else 1
        key = cache_key(module.backbone, module.model.meta, datamodule.preprocess, dataset, views, datamodule.augment)
        path = self.root / f"{split}-{key}.pt"
        if not path.is_file() and trainer.world_size > 1:
            # one rank computes, the others wait and read its file (or compute themselves without a shared disk)
            feats = self._compute(split, datamodule, module, views) if trainer.is_global_zero else None
            if feats is not None:
                self._save(feats, path)
            trainer.strategy.barrier("feature_cache")
            if feats is not None:
                return feats  # rank 0 keeps what it computed rather than reading it back
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                log.info("%s features loaded from %s", split, path)
                return FeatureSet(stored["features"], stored["targets"])
            except (OSError, RuntimeError, KeyError) as err:
                log.warning("ignoring unreadable feature cache %s (%s)", path, err)
        feats = self._compute(split, datamodule, module, views)
        self._save(feats, path)
        return feats

    @torch.no_grad()
    def _compute(self, split: str, datamodule: Any, module: L.LightningModule, views: int) -> FeatureSet:
        backbone, device = module.backbone, module.device
        was_training = backbone.training
        backbone.eval()  # pretrained BatchNorm statistics, no dropout: the features a frozen backbone gives
        out: list[Tensor] = []
        targets: Tensor | None = None
        try:
            for view in range(views):
                chunks, ys = [], []
                for x, y in datamodule.feature_batches(split, augmented=view > 0):
                    x, y = datamodule.prepare_batch((x.to(device), y), train=view > 0)
                    with module.trainer.precision_plugin.forward_context():
                        chunks.append(backbone(x).half().cpu())
                    ys.append(y.cpu())
                out.append(torch.cat(chunks))
                targets = torch.cat(ys)
        finally:
            backbone.train(was_training)
        self.computed.append(split)
        log.info("%s features computed: %d views x %s", split, views, tuple(out[0].shape))
        assert targets is not None
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
