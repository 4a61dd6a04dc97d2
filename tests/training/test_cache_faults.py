"""A cache is never fatal: a decode or feature cache that is damaged or does not fit is discarded and rebuilt."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_image_folder
from transfer.data.datasets import decode_cached_checked, list_images, scan_cached
from transfer.training.features import read_features

DAMAGE = {
    "random bytes": lambda path: path.write_bytes(os.urandom(4096)),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
}


def _features(path: Path, views: int = 1, count: int = 6, dim: int = 8) -> Path:
    targets = torch.arange(count) % 3
    torch.save({"features": torch.randn(views, count, dim).half(), "targets": targets}, path)
    return path


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_feature_cache_is_discarded_with_one_warning(tmp_path: Path, damage: str, caplog):
    path = _features(tmp_path / "train-key.pt")
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="transfer.training.features"):
        assert read_features(path, views=1, count=6, classes=3) is None
    assert not path.exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("views", "count", "classes", "why"),
    [(2, 6, 3, "2 view(s) of 6 images"), (1, 7, 3, "1 view(s) of 7 images"), (1, 6, 2, "targets outside 0..1")],
)
def test_a_feature_cache_of_the_wrong_shape_is_discarded(tmp_path: Path, views, count, classes, why, caplog):
    path = _features(tmp_path / "val-key.pt")
    with caplog.at_level(logging.WARNING, logger="transfer.training.features"):
        assert read_features(path, views=views, count=count, classes=classes) is None
    assert why in caplog.text and not path.exists()


def test_a_pickle_in_the_feature_cache_is_not_run(tmp_path: Path, caplog):
    import pickle

    path = tmp_path / "train-key.pt"
    path.write_bytes(pickle.dumps(os.system))  # weights_only refuses to resolve it
    with caplog.at_level(logging.WARNING, logger="transfer.training.features"):
        assert read_features(path, views=1, count=6, classes=3) is None
    assert "discarding feature cache" in caplog.text


def test_a_good_feature_cache_loads(tmp_path: Path):
    feats = read_features(_features(tmp_path / "train-key.pt", views=2), views=2, count=6, classes=3)
    assert feats is not None and len(feats) == 6 and feats.features.shape == (2, 6, 8)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    root = make_image_folder(tmp_path / "imgs", {"train": 2}, size=8)
    return list_images(root / "train", ["cat", "dog", "ship"])[0]


@pytest.mark.parametrize("damage", [*sorted(DAMAGE), "wrong shape", "a pickle"])
def test_a_bad_decode_cache_is_discarded_and_rebuilt(tmp_path: Path, files: list[Path], damage: str, caplog):
    cache = tmp_path / "cache"
    images, _ = decode_cached_checked(files, cache)
    (path,) = cache.glob("images-*.npy")
    if damage == "wrong shape":
        np.save(path, images[:-1])  # the right format, one image short
    elif damage == "a pickle":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    else:
        DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="transfer.data.decode"):
        again, bad = decode_cached_checked(files, cache)
    assert np.array_equal(again, images) and bad == {}
    assert caplog.text.count("discarding cache") == 1 and str(path) in caplog.text
    assert np.array_equal(np.load(path), images)  # rebuilt


def test_a_bad_scan_cache_is_discarded_and_rebuilt(tmp_path: Path, files: list[Path], caplog):
    cache = tmp_path / "cache"
    assert scan_cached(files, cache) == {}
    (path,) = cache.glob("scan-*.json")
    path.write_text('{"99": "row outside the files"}')
    with caplog.at_level(logging.WARNING, logger="transfer.data.decode"):
        assert scan_cached(files, cache) == {}
    assert "discarding cache" in caplog.text and path.read_text() == "{}"
