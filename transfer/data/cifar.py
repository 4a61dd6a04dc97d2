"""Finding CIFAR-10: an image-folder tree, the official python archive, or a torchvision download."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer.core.errors import DataNotFoundError
from transfer.data.datasets import decode_cached, list_classes, list_images

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ARCHIVE_DIR = "cifar-10-batches-py"
_ARCHIVE_FILE = "cifar-10-python.tar.gz"


@dataclass
class ArraySplits:
    """A dataset decoded into memory: uint8 ``(N, H, W, 3)`` arrays and class indices."""

    train_images: np.ndarray
    train_targets: list[int]
    test_images: np.ndarray
    test_targets: list[int]
    classes: list[str]
    source: str


def ensure_cifar10(root: str | Path, download: bool) -> Path:
    """Make sure CIFAR-10 is under ``root`` in a known layout, downloading it when allowed.

    Args:
        root: a folder holding ``train/<class>/*`` and ``test/<class>/*`` images, or ``cifar-10-batches-py/``,
            or ``cifar-10-python.tar.gz`` (also where a download goes).
        download: allow torchvision to download the python archive into ``root``.

    Returns:
        The normalised root folder.

    Raises:
        DataNotFoundError: nothing usable was found and the download was off or failed.
    """
    root = Path(root).expanduser()
    if root.name == _ARCHIVE_DIR:
        root = root.parent
    if _layout(root):
        return root
    reason = "data.download=false"
    if download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
            return root
        except Exception as err:  # URLError, HTTPError or RuntimeError, depending on how the download failed
            reason = f"the download failed ({type(err).__name__}: {err})"
    raise DataNotFoundError(
        f"CIFAR-10 was not found under data.root={root}. Looked for an image-folder tree ({root}/train/<class>/*.jpg "
        f"and {root}/test/<class>/*.jpg), the official python archive ({root}/{_ARCHIVE_DIR}/ or "
        f"{root}/{_ARCHIVE_FILE}), and {reason}. Fix: point data.root (or the TRANSFER_DATA environment variable) at "
        f"a local copy in one of those layouts, or run once with network access and data.download=true."
    )


def _layout(root: Path) -> str | None:
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folders"
    if (root / _ARCHIVE_DIR).is_dir() or (root / _ARCHIVE_FILE).is_file():
        return "archive"
    return None


def load_cifar10(root: str | Path, download: bool = False) -> ArraySplits:
    """Decode CIFAR-10 from ``root`` into memory (see :func:`ensure_cifar10` for the layouts)."""
    root = ensure_cifar10(root, download)
    return _from_image_folders(root) if _layout(root) == "folders" else _from_archive(root)


def _from_image_folders(root: Path) -> ArraySplits:
    classes = list_classes(root / "train")
    if not classes:
        raise DataNotFoundError(f"{root}/train has no class folders; expected train/<class>/<image> files.")
    train_files, train_targets = list_images(root / "train", classes)
    test_files, test_targets = list_images(root / "test", classes)
    if not train_files or not test_files:
        raise DataNotFoundError(
            f"{root}/train or {root}/test holds no image files; expected "
            f"train/<class>/<image> and test/<class>/<image> (.jpg, .png, ...)."
        )
    cache = cache_dir()
    log.info("loading %d images from %s (decoded once, cached in %s)", len(train_files) + len(test_files), root, cache)
    return ArraySplits(
        decode_cached(train_files, cache),
        train_targets,
        decode_cached(test_files, cache),
        test_targets,
        classes,
        f"image folders at {root}",
    )


def cache_dir() -> Path:
    """Where decoded image arrays are kept: ``$TRANSFER_CACHE`` or ``~/.cache/transfer/decoded``."""
    return Path(os.environ.get("TRANSFER_CACHE", Path.home() / ".cache" / "transfer" / "decoded")).expanduser()


def _from_archive(root: Path) -> ArraySplits:
    from torchvision.datasets import CIFAR10

    # With download=True torchvision first checks the archive's md5 and only downloads when it is missing:
    # here it just extracts a cifar-10-python.tar.gz that was copied into root.
    train = CIFAR10(str(root), train=True, download=not (root / _ARCHIVE_DIR).is_dir())
    test = CIFAR10(str(root), train=False, download=False)
    return ArraySplits(
        train.data, list(train.targets), test.data, list(test.targets), list(train.classes), f"python archive at {root}"
    )
