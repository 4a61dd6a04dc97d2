"""Datasets over in-memory arrays or image files, class discovery and stratified splits."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from transfer.core.errors import ConfigError, CorruptImagesError, DataNotFoundError
from transfer.data.decode import (
    IMAGE_EXTENSIONS,
    decode_error,
    describe_corrupt,
    is_image_file,
    read_cached_images,
    read_cached_reasons,
    read_rgb,
)

log = logging.getLogger(__name__)
__all__ = ["IMAGE_EXTENSIONS"]  # re-exported: transfer.predict filters files with it


def list_classes(folder: Path) -> list[str]:
    """Sorted sub-folder names of ``folder`` (one per class), ignoring hidden folders."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image files under ``folder/<class>/`` (recursively) with their class indices.

    Files are recognised by extension; anything else (``.txt``, ``Thumbs.db``, hidden files) is ignored.

    Args:
        folder: a split folder such as ``root/train``.
        classes: class names; a class folder missing here is an error, since indices must agree across splits.

    Returns:
        ``(files, targets)`` in a deterministic order.
    """
    files: list[Path] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DataNotFoundError(
                f"{folder} has no folder for class {name!r}, which the training split has. Every split must "
                f"contain the same class folders; add {class_dir} with images of that class, or remove the "
                f"class from every split."
            )
        found = sorted(p for p in class_dir.rglob("*") if is_image_file(p))
        files += found
        targets += [index] * len(found)
    return files, targets


# Decoding a small image is Python-bound (opening, EXIF, mode checks: ~0.2 ms of a 32 px JPEG's ~0.3 ms hold the
# GIL), so threads queue on each other; forked processes decode side by side (docs/speed-and-scale.md). Below this
# many files starting the pool costs more than it saves.
_POOL_MIN_FILES = 2000
_POOL_CHUNK = 512  # files per task: few enough tasks that their pickling is noise


def _read_array(path: Path, size: int | None) -> np.ndarray | str:
    """One row of :func:`decode_checked`: the image as an array, or why it cannot be decoded."""
    try:
        return np.asarray(read_rgb(path, size))
    except Exception:
        return decode_error(path) or "unreadable"


def _read_arrays(paths: Sequence[Path], size: int | None) -> list[np.ndarray | str]:
    return [_read_array(path, size) for path in paths]


def _decode_all(files: Sequence[Path], size: int | None) -> list[np.ndarray | str]:
    """:func:`_read_array` of every file, in order: in a process per core where ``fork`` is there (Linux), else
    in a thread per core (Pillow releases the GIL while it decodes)."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 2 or len(files) < _POOL_MIN_FILES:
        return _read_arrays(files, size)
    chunks = [files[i : i + _POOL_CHUNK] for i in range(0, len(files), _POOL_CHUNK)]
    pool: Executor = (
        ProcessPoolExecutor(min(workers, 8), mp_context=mp.get_context("fork"))
        if sys.platform == "linux"  # fork: the children need nothing re-imported (macOS forks unsafely, Windows not)
        else ThreadPoolExecutor(min(workers, 8))
    )
    with pool:
        return [row for rows in pool.map(_read_arrays, chunks, repeat(size)) for row in rows]


def decode_checked(files: Sequence[Path], size: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Decode images into one ``(N, H, W, 3)`` uint8 array, in a process per core (:func:`_decode_all`).

    Any mode, bit depth and EXIF orientation is handled (:func:`~transfer.data.decode.read_rgb`); files that
    cannot be decoded become all-zero rows and are reported, not raised.

    Args:
        files: image paths, all of the same size unless ``size`` is given.
        size: bring every image to ``size x size`` the way the eval transform does: shorter side resized to
            ``size``, then the centre square kept.

    Returns:
        The stacked array and ``{row: reason}`` for the files that could not be decoded.
    """
    results = _decode_all(files, size)
    bad = {i: r for i, r in enumerate(results) if isinstance(r, str)}
    arrays = [r for r in results if not isinstance(r, str)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataNotFoundError(
            f"Images under {files[0].parent.parent} have different sizes {sorted(shapes)[:3]}; "
            f"an in-memory CIFAR-style folder needs one size. Use data=imagefolder instead."
        )
    shape = next(iter(shapes)) if shapes else (size or 1, size or 1, 3)
    out = np.zeros((len(files), *shape), dtype=np.uint8)
    good = [i for i in range(len(files)) if i not in bad]
    if arrays:
        out[good] = np.stack(arrays)
    return out, bad


def files_digest(files: Sequence[Path], extra: str = "") -> str:
    """A key for a list of files from their paths, sizes and modification times (the files are not read)."""
    digest = hashlib.sha1(extra.encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_cached(files: Sequence[Path], cache_dir: Path, size: int | None = None) -> np.ndarray:
    """:func:`decode_cached_checked` that refuses corrupt files, naming the first ones (see its arguments)."""
    images, bad = decode_cached_checked(files, cache_dir, size)
    if bad:
        raise CorruptImagesError(describe_corrupt({files[i]: why for i, why in bad.items()}))
    return images


def decode_cached_checked(
    files: Sequence[Path], cache_dir: Path, size: int | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """:func:`decode_checked`, remembered on disk: decoding 60k JPEGs takes ~5 s on 2 cores, loading <1 s.

    The key hashes every file's path, size and modification time (and ``size``), so adding, removing or
    editing an image invalidates the cache without reading the images. The rows that failed to decode are
    kept beside the array (``<key>.bad.json``). A cache that cannot be written is skipped, not an error.

    Args:
        files: image paths (same size unless ``size`` is given).
        cache_dir: where ``<key>.npy`` files live.
        size: see :func:`decode_checked`.

    Returns:
        The ``(N, H, W, 3)`` uint8 array and ``{row: reason}`` for the files that could not be decoded.
    """
    path = cache_dir / f"images-{files_digest(files, '' if size is None else f'fit{size}')}.npy"
    bad_path = path.with_suffix(".bad.json")
    if path.is_file():  # validated against the files; anything else is discarded with a warning and rebuilt
        cached = read_cached_images(path, len(files), size)
        bad_cached = read_cached_reasons(bad_path, len(files)) if bad_path.is_file() else {}
        if cached is not None and bad_cached is not None:
            return cached, bad_cached
    images, bad = decode_checked(files, size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if bad:
            bad_path.write_text(json.dumps(bad))
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, images)
        tmp.replace(path)  # atomic: a concurrent run never reads a half-written file
    except OSError as err:
        log.warning("could not write decode cache %s (%s); the next run decodes again", path, err)
    return images, bad


def scan_cached(files: Sequence[Path], cache_dir: Path) -> dict[int, str]:
    """``{row: reason}`` for the files that cannot be decoded, remembered on disk like :func:`decode_cached`.

    For folders streamed from disk: one full decode of every file up front, so a corrupt image is found
    before training rather than in the middle of an epoch.
    """
    path = cache_dir / f"scan-{files_digest(files, 'scan')}.json"
    if path.is_file():
        cached = read_cached_reasons(path, len(files))
        if cached is not None:
            return cached
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reasons = list(pool.map(decode_error, files, chunksize=64))
    bad = {i: why for i, why in enumerate(reasons) if why is not None}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(bad))
    except OSError as err:
        log.warning("could not write scan cache %s (%s)", path, err)
    return bad


class ArrayImages(Dataset):
    """Images held as a uint8 ``(N, H, W, 3)`` array, turned into PIL per item (as torchvision's CIFAR10 does).

    Args:
        images: the array (shared, not copied, between the splits that index it).
        targets: class index per image.
        indices: which rows of ``images`` this split uses.
        transform: applied to each PIL image.
    """

    def __init__(
        self, images: np.ndarray, targets: Sequence[int], indices: Sequence[int], transform: Callable | None
    ) -> None:
        self.images, self.targets, self.indices, self.transform = (
            images,
            np.asarray(targets),
            np.asarray(indices),
            transform,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.indices[i]
        img = Image.fromarray(self.images[row])
        return (self.transform(img) if self.transform else img), int(self.targets[row])


class TensorImages(Dataset):
    """uint8 images served a whole batch at a time, for augmentation on the training device.

    The DataLoader hands ``__getitems__`` the batch's indices, so a batch is one fancy-indexing copy out of the
    in-memory array, with no per-image Python and no collation; pair it with :func:`keep_batch`.

    Args:
        images: uint8 ``(N, H, W, 3)`` array (shared, not copied, between the splits that index it).
        targets: class index per image.
        indices: which rows of ``images`` this split uses.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], indices: Sequence[int]) -> None:
        self.images, self.targets, self.indices = images, torch.as_tensor(np.asarray(targets)), np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = self.indices[np.asarray(items)]
        # (B, H, W, 3) -> a (B, 3, H, W) view: channels-last in memory, which is what the model wants anyway
        return torch.from_numpy(self.images[rows]).permute(0, 3, 1, 2), self.targets[rows]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        images, targets = self.__getitems__([i])
        return images[0], int(targets[0])


def keep_batch(batch: Any) -> Any:
    """DataLoader ``collate_fn`` for datasets whose ``__getitems__`` already returns a stacked batch."""
    return batch


class FileImages(Dataset):
    """Images read from disk per item, for folders too large (or too varied in size) to hold in memory."""

    def __init__(
        self, files: Sequence[Path], targets: Sequence[int], indices: Sequence[int], transform: Callable | None
    ) -> None:
        self.files, self.targets, self.indices, self.transform = (
            list(files),
            np.asarray(targets),
            np.asarray(indices),
            transform,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.indices[i]
        img = read_rgb(self.files[row])
        return (self.transform(img) if self.transform else img), int(self.targets[row])


def split_count(size: float, total: int, what: str) -> int:
    """Turn a fraction (< 1) or a count (>= 1) into a count, checking it leaves something to train on."""
    count = round(size * total) if 0 < size < 1 else int(size)
    if count < 0 or count >= total:
        raise ConfigError(
            f"{what}={size} asks for {count} of {total} images; use a fraction below 1 or a count below {total}."
        )
    return count


def stratified_split(targets: Sequence[int], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep, held_out)`` with ``count`` held out, in proportion to each class.

    Per-class shares are rounded by largest remainder so the total is exact, and no class gives up its
    last image. The same ``seed`` gives the same split on every machine (NumPy's PCG64).

    Args:
        targets: class index per sample.
        count: number of samples to hold out.
        seed: split seed.

    Returns:
        ``keep`` (sorted) and ``held_out`` in a seeded random order, so that evaluating only the first
        batches (``trainer.limit_val_batches``) still sees every class rather than the first one or two.
    """
    labels = np.asarray(targets)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / len(labels)
    take = np.minimum(np.floor(quota).astype(int), sizes - 1)
    for i in np.argsort(-(quota - take)):
        if take.sum() >= count:
            break
        if take[i] < sizes[i] - 1:
            take[i] += 1
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for cls, n in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[:n])
    held_out = rng.permutation(np.concatenate(held)) if held else np.array([], dtype=int)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def mixed_order(count: int, seed: int) -> np.ndarray:
    """All indices in a seeded random order: class-sorted test folders evaluated in part stay representative."""
    return np.random.default_rng(seed).permutation(count)
