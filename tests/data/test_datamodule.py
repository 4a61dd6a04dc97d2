from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CLASSES, make_image_folder
from transfer.core.errors import ConfigError, DataNotFoundError
from transfer.core.preprocess import Preprocess
from transfer.data import CIFAR10Data, ImageFolderData, stratified_split


def pre(size: int = 32, native: int | None = None) -> Preprocess:
    """What a model's weights would hand the data module (tests pick size and normalisation directly);
    ``native``: the data's own size (32 for CIFAR-10), ``None`` for photos."""
    return Preprocess(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), native_size=native)


def ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def model_batch(dm, split: str = "train"):
    """The first batch of a split as the model receives it (after the device-side step, where there is one)."""
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return dm.prepare_batch(next(iter(loader)), train=split == "train")


PATHS = pytest.mark.parametrize("augment_on", ["device", "cpu_pil"])


def test_stratified_split_is_exact_proportional_and_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = stratified_split(targets, 10, seed=3)
    assert len(held) == 10 and len(keep) == 90
    assert set(keep).isdisjoint(held) and sorted(set(keep) | set(held)) == list(range(100))
    assert np.bincount(np.asarray(targets)[held]).tolist() == [5, 3, 2]
    assert np.array_equal(held, stratified_split(targets, 10, seed=3)[1])
    assert not np.array_equal(held, stratified_split(targets, 10, seed=4)[1])


def test_stratified_split_never_takes_a_class_last_image():
    keep, held = stratified_split([0, 1, 1, 1, 1, 1, 1, 1, 1, 1], 5, seed=0)
    assert 0 in keep and len(held) == 5


@PATHS
def test_cifar_folders_split_sizes_shapes_and_normalisation(tiny_cifar: Path, augment_on: str):
    dm = ready(
        CIFAR10Data(
            str(tiny_cifar),
            download=False,
            preprocess=pre(native=32),
            val_size=6,
            num_workers=0,
            batch_size=4,
            eval_batch_size=6,
            augment_on=augment_on,
        )
    )
    assert dm.classes == list(CLASSES)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 6, 12)
    val_labels = [dm.val_set[i][1] for i in range(len(dm.val_set))]
    assert sorted(val_labels) == [0, 0, 1, 1, 2, 2]  # stratified: 2 per class
    x, y, _ = model_batch(dm, "train")
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Eval images are normalised with the model's statistics: (pixel/255 - 0.5) / 0.25.
    x, y, _ = model_batch(dm, "val")
    raw = torch.from_numpy(dm.val_set.images[dm.val_set.indices]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-5)
    assert y.tolist() == [dm.val_set[i][1] for i in range(6)]


@PATHS
def test_resize_adapt_feeds_the_models_pretrained_size(tiny_cifar: Path, augment_on: str):
    dm = ready(
        CIFAR10Data(
            str(tiny_cifar),
            download=False,
            val_size=3,
            num_workers=0,
            batch_size=4,
            augment_on=augment_on,
            preprocess=pre(48, native=32),
        )
    )
    assert dm.preprocess.image_size == 48
    assert model_batch(dm, "train")[0].shape == (4, 3, 48, 48) and model_batch(dm, "test")[0].shape[1:] == (3, 48, 48)


def test_train_augmentation_varies_while_eval_is_deterministic(tiny_cifar: Path):
    dm = ready(
        CIFAR10Data(
            str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=3, num_workers=0, augment_on="cpu_pil"
        )
    )
    assert not torch.equal(dm.train_set[0][0], dm.train_set[0][0])
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    dm = ready(
        CIFAR10Data(
            str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=3, num_workers=0, augment_on="device"
        )
    )
    batch = next(iter(dm.train_dataloader()))
    assert not torch.equal(dm.prepare_batch(batch, train=True)[0], dm.prepare_batch(batch, train=True)[0])
    assert torch.equal(dm.prepare_batch(batch, train=False)[0], dm.prepare_batch(batch, train=False)[0])


def test_unknown_augment_path_is_a_config_error(tiny_cifar: Path):
    with pytest.raises(ConfigError, match="augment_on"):
        CIFAR10Data(str(tiny_cifar), augment_on="gpu")


def _write_python_archive(root: Path, per_batch: int = 10) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
            "labels": (np.arange(per_batch) % 10).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_official_python_archive_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write_python_archive(tmp_path)
    # Our fabricated batches have other md5s than the real ones torchvision checks.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    dm = ready(CIFAR10Data(str(tmp_path), download=False, preprocess=pre(native=32), val_size=10, num_workers=0))
    assert "python archive" in dm.source
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    assert dm.train_set[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar_gives_one_actionable_error(tmp_path: Path, download: bool):
    dm = CIFAR10Data(str(tmp_path / "nowhere"), download=download, num_workers=0)
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    text = str(err.value)
    assert "nowhere" in text and "data.root" in text and "cifar-10-batches-py" in text
    assert ("download failed" in text) == download


@PATHS
def test_imagefolder_splits_val_and_test_out_of_train_when_absent(tmp_path: Path, augment_on: str):
    root = make_image_folder(tmp_path / "mine", {"train": 10})
    dm = ready(
        ImageFolderData(
            str(root),
            val_size=0.2,
            test_size=0.1,
            num_workers=0,
            preprocess=pre(40),
            batch_size=4,
            augment_on=augment_on,
        )
    )
    assert dm.classes == list(CLASSES)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (21, 6, 3)
    rows = [set(ds.indices.tolist()) for ds in (dm.train_set, dm.val_set, dm.test_set)]
    assert rows[0].isdisjoint(rows[1]) and rows[0].isdisjoint(rows[2]) and rows[1].isdisjoint(rows[2])
    assert model_batch(dm, "train")[0].shape == (4, 3, 40, 40) and model_batch(dm, "val")[0].shape == (6, 3, 40, 40)
    assert ("decoded into memory" in dm.source) == (augment_on == "device")


def test_imagefolder_uses_validation_and_test_folders(tmp_path: Path):
    root = make_image_folder(tmp_path / "mine", {"train": 6, "validation": 2, "test": 3}, size=50)
    dm = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32)))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 9)


def test_imagefolder_too_large_for_memory_streams_from_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = make_image_folder(tmp_path / "mine", {"train": 6}, size=50)
    dm = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32), memory_limit_gb=1e-6))
    assert "decoded into memory" not in dm.source and "memory_limit_gb" in caplog.text
    x = model_batch(dm, "train").x
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)


def test_in_memory_photo_eval_view_equals_the_pil_eval_transform(tmp_path: Path):
    """Decoding to image_size / crop_pct and centre-cropping on the device gives the PIL eval pipeline's pixels."""
    root = make_image_folder(tmp_path / "mine", {"train": 4, "test": 2}, size=70)
    pil = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(48), val_size=2, augment_on="cpu_pil"))
    dev = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(48), val_size=2, augment_on="device"))
    a, b = model_batch(pil, "test")[0], model_batch(dev, "test")[0]
    assert a.shape == b.shape == (6, 3, 48, 48)
    assert (a - b).abs().mean() < 0.05  # resampling filters differ by a grey level or two, nothing more


def test_imagefolder_without_train_folder_says_what_to_do(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match="train/<class>/<image>"):
        _ = ImageFolderData(str(tmp_path)).classes


def test_split_larger_than_dataset_is_a_config_error(tiny_cifar: Path):
    with pytest.raises(ConfigError, match=r"data\.val_size"):
        ready(CIFAR10Data(str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=1000, num_workers=0))


def test_decoded_images_are_cached_and_invalidated_by_changes(tiny_cifar: Path, tmp_path: Path):
    from PIL import Image

    from transfer.data.datasets import decode_cached, list_images

    files, _ = list_images(tiny_cifar / "train", list(CLASSES))
    first = decode_cached(files, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    assert np.array_equal(decode_cached(files, tmp_path / "c"), first)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(files[0])
    changed = decode_cached(files, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2 and tuple(changed[0, 0, 0]) == (1, 2, 3)


def test_partial_evaluation_sees_every_class(tiny_cifar: Path):
    """limit_val_batches / limit_test_batches read the first batches: those must not be one class only."""
    dm = ready(CIFAR10Data(str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=6, num_workers=0))
    first_test = [dm.test_set[i][1] for i in range(4)]
    first_val = [dm.val_set[i][1] for i in range(3)]
    assert len(set(first_test)) > 1 and len(set(first_val)) > 1


def test_set_train_size_resizes_the_batched_training_batches_only(tiny_cifar: Path):
    dm = ready(CIFAR10Data(str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=6, num_workers=0))
    assert dm.batched_augment
    dm.set_train_size(16)
    assert model_batch(dm, "train").x.shape[-1] == 16
    assert model_batch(dm, "val").x.shape[-1] == 32  # evaluation keeps the model's size
    dm.set_train_size(None)
    assert model_batch(dm, "train").x.shape[-1] == 32


def test_batched_augment_says_which_paths_bypass_the_batched_augmentation(tiny_cifar: Path):
    pil = ready(
        CIFAR10Data(
            str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=6, num_workers=0, augment_on="cpu_pil"
        )
    )
    streamed = ready(ImageFolderData(str(tiny_cifar), num_workers=0, preprocess=pre(32), memory_limit_gb=1e-6))
    in_memory = ready(ImageFolderData(str(tiny_cifar), num_workers=0, preprocess=pre(32)))
    assert (pil.batched_augment, streamed.batched_augment, in_memory.batched_augment) == (False, False, True)


def _test_files(dm) -> list[str]:
    return sorted(str(dm.test_set.files[i]) for i in dm.test_set.indices.tolist())


@pytest.mark.parametrize("folders", [{"train": 6, "validation": 2, "test": 3}, {"train": 10}])
def test_train_on_val_trains_on_the_validation_images_and_tests_the_same_ones(tmp_path: Path, folders: dict):
    root = make_image_folder(tmp_path / "mine", folders, size=40)
    args = {"num_workers": 0, "preprocess": pre(32), "val_size": 0.2, "test_size": 0.1, "augment_on": "cpu_pil"}
    held, merged = (
        ready(ImageFolderData(str(root), **args)),
        ready(ImageFolderData(str(root), train_on_val=True, **args)),
    )
    assert merged.val_set is None and len(merged.train_set) == len(held.train_set) + len(held.val_set)
    trained = {str(merged.train_set.files[i]) for i in merged.train_set.indices.tolist()}
    validated = {str(held.val_set.files[i]) for i in held.val_set.indices.tolist()}
    assert validated <= trained and len(trained) == len(merged.train_set)  # each image once
    assert _test_files(merged) == _test_files(held) and not trained & set(_test_files(merged))
    described = merged.describe()
    assert described["train_on_val"] is True and "val_size" not in described
    assert described["val_from"].startswith("none") and "train_on_val" in described["val_from"]
    in_memory = ready(ImageFolderData(str(root), train_on_val=True, **{**args, "augment_on": "device"}))
    assert len(in_memory.train_set) == len(merged.train_set) and len(in_memory.test_set) == len(held.test_set)
    assert model_batch(in_memory, "train").x.shape[1:] == (3, 32, 32)


def test_cifar_train_on_val_keeps_every_training_image(tiny_cifar: Path):
    dm = ready(CIFAR10Data(str(tiny_cifar), download=False, preprocess=pre(native=32), val_size=6, num_workers=0,
                           train_on_val=True))  # fmt: skip
    assert dm.val_set is None and len(dm.train_set) == 36 and len(set(dm.train_set.indices.tolist())) == 36
    with pytest.raises(ConfigError, match=r"data\.train_on_val=true gave its images to training"):
        dm.val_dataloader()


def test_a_model_trained_on_its_validation_images_cannot_be_scored_on_them(tiny_cifar: Path):
    with pytest.raises(ConfigError, match="split=test"):
        CIFAR10Data(str(tiny_cifar), preprocess=pre(native=32), train_on_val=True, predict_split="val")
