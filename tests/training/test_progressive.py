"""Progressive resizing: the sizes it trains at, and the settings it refuses at fit start."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest

from tests.helpers import make_image_folder
from tests.training.test_budget import FakeClock, SlowsDown, TwoPoints, _fake_clock_run
from transfer.core.errors import ConfigError
from transfer.data import CIFAR10Data, ClassificationData, ImageFolderData
from transfer.models import model_preprocess
from transfer.training.features import CachedFeatureData, FeatureCache
from transfer.training.finetune import StagedFinetuning
from transfer.training.module import Classifier
from transfer.training.progressive import ProgressiveResize

# The tiny test architectures are registered for each test of this module only (conftest.tiny_models).
pytestmark = pytest.mark.usefixtures("tiny_models")
MODEL = {"name": "tiny_test_cnn", "pretrained": False}
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}


class TrainSizes(L.Callback):
    """The side length of every training batch, per epoch."""

    def __init__(self) -> None:
        self.sizes: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.setdefault(trainer.current_epoch, set()).add(batch.x.shape[-1])


def cifar(root: Path, **args: Any) -> CIFAR10Data:
    """Tiny CIFAR at its own 32 px, with the tiny model's preprocessing."""
    pre = model_preprocess(MODEL["name"], "native", None, CIFAR10Data.native_size)
    return CIFAR10Data(str(root), download=False, val_size=6, num_workers=0, batch_size=8, preprocess=pre, **args)


def fit(
    data: ClassificationData | CachedFeatureData, resize: ProgressiveResize, epochs: int, *extra: L.Callback
) -> TrainSizes:
    L.seed_everything(0)
    sizes = TrainSizes()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=1,
        reload_dataloaders_every_n_epochs=1 if isinstance(data, CachedFeatureData) else 0,
        callbacks=[*extra, resize, sizes],
    )
    trainer.fit(Classifier(MODEL, data.classes, ADAM), datamodule=data)
    return sizes


def test_sizes_grow_per_epoch_and_reach_the_full_size(tiny_cifar: Path):
    sizes = fit(cifar(tiny_cifar), ProgressiveResize(start_size=16, full_at_epoch=2), epochs=3)
    assert sizes.sizes == {0: {16}, 1: {24}, 2: {32}}


def test_a_start_size_that_shrinks_nothing_is_refused(tiny_cifar: Path):
    with pytest.raises(ConfigError, match=r"start_size=32 is not below the model's image_size=32"):
        fit(cifar(tiny_cifar), ProgressiveResize(start_size=32, full_at_epoch=1), epochs=2)


@pytest.mark.parametrize("full_at_epoch", [2, 5])
def test_a_schedule_that_never_reaches_the_full_size_is_refused(tiny_cifar: Path, full_at_epoch: int):
    """Epochs count from 0: with 2 epochs, full_at_epoch=2 would train its last epoch below the full size."""
    with pytest.raises(ConfigError, match=rf"full_at_epoch={full_at_epoch} is not below trainer.max_epochs=2"):
        fit(cifar(tiny_cifar), ProgressiveResize(start_size=16, full_at_epoch=full_at_epoch), epochs=2)


def test_pil_augmented_batches_are_refused(tiny_cifar: Path):
    with pytest.raises(ConfigError, match=r"bypass the batched augmentation .*augment_on=cpu_pil"):
        fit(cifar(tiny_cifar, augment_on="cpu_pil"), ProgressiveResize(start_size=16, full_at_epoch=1), epochs=2)


def test_image_folders_streamed_from_disk_are_refused(tmp_path: Path):
    root = make_image_folder(tmp_path / "photos", {"train": 6})
    pre = model_preprocess(MODEL["name"], "native", 32, None)
    streamed = ImageFolderData(str(root), num_workers=0, batch_size=4, preprocess=pre, memory_limit_gb=1e-6)
    with pytest.raises(ConfigError, match=r"bypass the batched augmentation .*augment_on=device"):
        fit(streamed, ProgressiveResize(start_size=16, full_at_epoch=1), epochs=2)


def test_the_cached_feature_wrapper_passes_the_size_on(tiny_cifar: Path, tmp_path: Path):
    """With cache_features the frozen epoch trains on features; the images after the unfreeze are resized."""
    data = CachedFeatureData(cifar(tiny_cifar), FeatureCache(1, root=tmp_path / "features"))
    sizes = fit(data, ProgressiveResize(start_size=16, full_at_epoch=2), 3, StagedFinetuning(unfreeze_at_epoch=1))
    assert sizes.sizes[1] == {24} and sizes.sizes[2] == {32}


class SizedPoints(TwoPoints):
    """The budget tests' data, with the data module API progressive resizing drives (32 px, batched)."""

    preprocess = SimpleNamespace(image_size=32)
    batched_augment, source, augment_on = True, "points", "device"

    def __init__(self) -> None:
        super().__init__()
        self.train_size: int | None = None

    def set_train_size(self, size: int | None) -> None:
        self.train_size = size


class CostsItsPixels(SlowsDown):
    """A step 'takes' 1 s at 32 px and its share of the pixels below; records the size of every step."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, fast=0)
        self.sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        size = self.trainer.datamodule.train_size or 32
        self.sizes.append(size)
        self.clock.now += (size / 32) ** 2
        return self.net(batch[0]).pow(2).mean()


def test_under_a_budget_the_size_follows_the_plan_and_the_run_still_ends_at_the_budget(monkeypatch, tmp_path: Path):
    """The epochs are the planner's output: the size grows with the planned steps and is full from half of them."""
    clock, planner, trainer = _fake_clock_run(monkeypatch, tmp_path)
    resize = ProgressiveResize(start_size=16, full_at_epoch=99, budget_full_at=0.5)  # no epoch limit to refuse
    trainer.callbacks.insert(0, resize)
    model, data = CostsItsPixels(clock), SizedPoints()
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    assert planner.plan is not None and planner.plan.planned_steps == trainer.global_step == len(model.sizes)
    steps = len(model.sizes)
    assert model.sizes[: planner.probe_steps] == [16] * planner.probe_steps  # the probe trains at the start size
    assert model.sizes == sorted(model.sizes) and set(model.sizes) == {16, 24, 32}
    # 16 px growing to 32 by half of the steps: 28 px (3/8 of the steps) is the first to round to 32
    assert abs(model.sizes.index(32) - 3 / 8 * steps) <= 0.02 * steps
    spent = clock.now - 1000.0
    assert 600 * 0.98 <= spent + planner.plan.margin_s <= 600  # the probe's speed alone: 3x the steps
