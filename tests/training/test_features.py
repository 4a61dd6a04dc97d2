from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from transfer.core.errors import ConfigError
from transfer.data import CIFAR10Data
from transfer.data.datasets import TensorImages
from transfer.models import model_preprocess
from transfer.training.features import CachedFeatureData, FeatureCache, cache_key
from transfer.training.finetune import StagedFinetuning
from transfer.training.module import Classifier

# The tiny test architectures are registered for each test of this module only (conftest.tiny_models).
pytestmark = pytest.mark.usefixtures("tiny_models")
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}


class BatchKinds(L.Callback):
    """Which kind of batch (cached features or images) each training epoch received."""

    def __init__(self) -> None:
        self.kinds: dict[int, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.kinds[trainer.current_epoch] = "features" if batch.features else "images"


def data(root: Path, **dm_args: Any) -> CIFAR10Data:
    """Tiny CIFAR with the tiny model's preprocessing, as a run builds it."""
    pre = model_preprocess("tiny_test_cnn", "native", None, CIFAR10Data.native_size)
    return CIFAR10Data(str(root), download=False, val_size=6, num_workers=0, preprocess=pre, **dm_args)


def fit(
    root: Path,
    cache: Path | None,
    max_epochs: int,
    unfreeze: int | None,
    batch_size: int = 8,
    augment: dict | None = None,
    eval_batch_size: int = 256,
    **trainer_args: Any,
) -> tuple[Classifier, BatchKinds, FeatureCache | None]:
    L.seed_everything(0)
    feature_cache = FeatureCache(unfreeze, root=cache) if cache else None
    dm = data(root, batch_size=batch_size, eval_batch_size=eval_batch_size, augment=augment)
    module = Classifier({"name": "tiny_test_cnn", "pretrained": False}, dm.classes, ADAM)
    kinds = BatchKinds()
    callbacks = [StagedFinetuning(unfreeze_at_epoch=unfreeze, bn="frozen"), kinds]
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1 if cache else 0,
        **trainer_args,
    )
    trainer.fit(module, datamodule=CachedFeatureData(dm, feature_cache) if feature_cache else dm)
    return module, kinds, feature_cache


def test_frozen_epochs_train_on_features_then_images_after_the_unfreeze(tiny_cifar: Path, tmp_path: Path):
    _, kinds, cache = fit(tiny_cifar, tmp_path / "f", max_epochs=3, unfreeze=2)
    assert kinds.kinds == {0: "features", 1: "features", 2: "images"}
    assert sorted(cache.computed) == ["train", "val"]
    assert len(list((tmp_path / "f").glob("*.pt"))) == 2
    _, _, again = fit(tiny_cifar, tmp_path / "f", max_epochs=1, unfreeze=2)
    assert again.computed == []  # same model, weights, size and data: read back from disk


def test_cached_head_training_matches_the_uncached_frozen_phase(tiny_cifar: Path, tmp_path: Path):
    """No augmentation, frozen BN, one full batch per epoch: the two paths see the same features, so the
    head must end up the same (up to the float16 the features are stored in)."""
    common = dict(max_epochs=3, unfreeze=None, batch_size=64, augment={})
    cached, kinds, _ = fit(tiny_cifar, tmp_path / "f", **common)
    plain, _, _ = fit(tiny_cifar, None, **common)
    assert set(kinds.kinds.values()) == {"features"}
    for a, b in zip(cached.head.parameters(), plain.head.parameters(), strict=True):
        assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()
    L.seed_everything(0)
    untrained = Classifier({"name": "tiny_test_cnn", "pretrained": False}, cached.class_names, ADAM)
    moved = [(a - b).abs().max() for a, b in zip(cached.head.parameters(), untrained.head.parameters(), strict=True)]
    assert max(moved) > 1e-2  # the head did train


def _key(module: Classifier, dm: CIFAR10Data, **change: Any) -> str:
    pre = dataclasses.replace(dm.preprocess, **change.pop("preprocess", {})).to_dict()
    return cache_key(module.backbone, module.model.meta, pre, change.pop("dataset", dm.train_set), 1, dm.augment)


def _ready(root: Path) -> tuple[Classifier, CIFAR10Data]:
    dm = data(root)
    module = Classifier({"name": "tiny_test_cnn", "pretrained": False}, dm.classes, ADAM)
    dm.setup("fit")
    return module, dm


def test_cache_key_changes_with_model_weights_image_size_and_data(tiny_cifar: Path):
    module, dm = _ready(tiny_cifar)
    base = _key(module, dm)
    assert _key(module, dm) == base
    other_model = Classifier({"name": "tiny_test_neck", "pretrained": False}, dm.classes, ADAM)
    assert _key(other_model, dm) != base
    with torch.no_grad():
        next(module.backbone.parameters())[0].add_(1e-3)
    changed_weights = _key(module, dm)
    assert changed_weights != base
    assert _key(module, dm, preprocess={"image_size": 48}) != changed_weights
    ds = dm.train_set
    fewer = TensorImages(ds.images, ds.targets.numpy(), ds.indices[1:])
    assert _key(module, dm, dataset=fewer) != changed_weights
    edited = ds.images.copy()
    edited[0, 0, 0, 0] ^= 1
    assert _key(module, dm, dataset=TensorImages(edited, ds.targets.numpy(), ds.indices)) != changed_weights


def test_bn_running_stats_are_part_of_the_weights_key(tiny_cifar: Path):
    module, dm = _ready(tiny_cifar)
    before = _key(module, dm)
    bn = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean += 0.5
    assert _key(module, dm) != before


def test_views_must_be_positive():
    with pytest.raises(ConfigError, match="cache_views"):
        FeatureCache(2, views=0)


def test_cached_features_cover_only_what_limit_train_batches_lets_an_epoch_see(tiny_cifar: Path, tmp_path: Path):
    """limit_*_batches cut the extraction too: a quick run must not extract the whole training set first."""
    _, _, cache = fit(
        tiny_cifar,
        tmp_path / "f",
        max_epochs=1,
        unfreeze=None,
        batch_size=4,
        eval_batch_size=2,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    train, val = cache.sets.get("train"), cache.sets.get("val")
    assert train is None and val is None  # released at the end of fit
    stored = {p.name.split("-")[0]: torch.load(p, weights_only=True)["targets"] for p in (tmp_path / "f").glob("*.pt")}
    full = data(tiny_cifar)
    full.setup("fit")
    assert len(stored["train"]) == 2 * 4 < len(full.train_set)
    assert len(stored["val"]) == 2 < len(full.val_set)  # one val batch of 2
    assert len(set(stored["train"].tolist())) > 1  # a spread over the split, not the first (class-sorted) images


def test_the_cache_serves_exactly_the_frozen_epochs_of_the_finetuning_rule():
    cache = FeatureCache(2)
    finetune = StagedFinetuning(unfreeze_at_epoch=2)
    assert (
        [cache.serves(e) for e in range(4)] == [finetune.frozen_at(e) for e in range(4)] == [True, True, False, False]
    )
    assert all(FeatureCache(None).serves(e) for e in range(3))  # a linear probe: cached throughout


def test_the_wrapper_passes_the_data_module_on(tiny_cifar: Path):
    """What a run reads from its data module (class names, summary, batch size, hyperparameters, the batch
    step) is the wrapped data module's, and the trainer Lightning sets on the wrapper reaches it."""
    dm = data(tiny_cifar, batch_size=4)
    wrapped = CachedFeatureData(dm, FeatureCache(1))
    wrapped.prepare_data()
    wrapped.setup("fit")
    assert wrapped.classes == dm.classes and wrapped.batch_size == 4 and wrapped.preprocess is dm.preprocess
    assert wrapped.describe() == dm.describe() and wrapped.describe()["train_size"] > 0
    assert wrapped.hparams_initial == dm.hparams_initial and wrapped.hparams["batch_size"] == 4
    assert wrapped.test_dataloader().dataset is dm.test_set  # the test split is never cached
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    wrapped.trainer = trainer
    assert dm.trainer is trainer and wrapped.trainer is trainer
