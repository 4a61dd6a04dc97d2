"""Your own images as a LightningDataModule: ``root/train/<class>/*`` with optional ``val/`` and ``test/`` folders,
or the flat ``root/<class>/*``, decoded once into memory where they fit and streamed from disk where not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from transfer.core.errors import CorruptImagesError
from transfer.data.cifar import cache_dir
from transfer.data.datamodule import ClassificationData, Images
from transfer.data.datasets import (
    FileImages,
    TensorImages,
    decode_cached_checked,
    list_images,
    mixed_order,
    scan_cached,
    split_count,
    stratified_split,
)
from transfer.data.decode import describe_corrupt
from transfer.data.folders import check_classes, check_not_empty, find_layout

log = logging.getLogger(__name__)


class ImageFolderData(ClassificationData):
    """A user's images: ``root/train/<class>/*`` plus optional ``val/`` (or ``validation/``) and ``test/``, or
    the flat ``root/<class>/*``.

    Missing validation or test splits are held out of the training images, stratified by class and seeded.
    Every split must hold the same, non-empty class folders. Images of any mode, bit depth and EXIF
    orientation are converted to upright 8-bit RGB; non-image files are ignored; files that cannot be decoded
    are an error naming them, or, with ``skip_corrupt``, left out and counted (:meth:`describe`).

    Args:
        val_size: fraction (< 1) or count (>= 1) of train held out when there is no val folder.
        test_size: likewise when there is no test folder.
        memory_limit_gb: above this, images stream from disk through PIL workers instead of living in memory.
        skip_corrupt: leave out undecodable files (logged, counted in the summary) instead of failing.
        **kwargs: see :class:`ClassificationData`.
    """

    default_augment: ClassVar[dict[str, Any]] = {
        "resized_crop_scale": (0.35, 1.0),
        "hflip": True,
        "color_jitter": (0.2, 0.2, 0.2, 0.1),
        "rotation": 15,
    }

    def __init__(
        self,
        root: str,
        val_size: float = 0.1,
        test_size: float = 0.1,
        memory_limit_gb: float = 4.0,
        skip_corrupt: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.val_size, self.test_size = val_size, test_size
        self.memory_limit_gb = float(memory_limit_gb)
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped: dict[Path, str] = {}
        self.origins: dict[str, str] = {}  # where the val and test images came from, for the summary

    @property
    def classes(self) -> list[str]:
        train_dir, splits = find_layout(self.root)
        return check_classes(train_dir, splits)

    @property
    def layout(self) -> str:
        """``split`` (``root/train/...``) or ``flat`` (``root/<class>/...``)."""
        return "split" if find_layout(self.root)[0] != self.root else "flat"

    def _splits(self) -> dict[str, tuple[list[Path], list[int], list[int]]]:
        """``{split: (files, targets, indices)}``, holding val/test out of train where their folders are missing
        (``train_on_val``: no ``val`` entry, its images in ``train``)."""
        train_dir, folders = find_layout(self.root)
        classes = check_classes(train_dir, folders)
        files, targets = list_images(train_dir, classes)
        check_not_empty("train", train_dir, classes, targets)
        keep = list(range(len(files)))
        splits: dict[str, tuple[list[Path], list[int], list[int]]] = {}
        for name, size in (("test", self.test_size), ("val", self.val_size)):
            if name in folders:
                split_files, split_targets = list_images(folders[name], classes)
                check_not_empty(name, folders[name], classes, split_targets)
                splits[name] = (split_files, split_targets, list(mixed_order(len(split_files), self.split_seed)))
                self.origins[name] = f"the {folders[name].name}/ folder"
                continue
            sub_targets = [targets[i] for i in keep]
            # Fractions are of the whole train folder, so val_size=0.1 means 10% whether or not test exists.
            count = split_count(size, len(files), f"data.{name}_size")
            kept, held = stratified_split(sub_targets, min(count, len(keep) - 1), self.split_seed)
            splits[name] = (files, targets, [keep[i] for i in held])
            keep = [keep[i] for i in kept]
            self.origins[name] = (
                f"held out of the {train_dir.name}/ folder (there is no {name}/ folder; data.{name}_size={size})"
                if train_dir != self.root
                else f"held out of the class folders (data.{name}_size={size})"
            )
        if self.train_on_val:
            keep = self._with_val(splits.pop("val"), files, targets, keep)
        splits["train"] = (files, targets, keep)
        return splits

    def _with_val(
        self, val: tuple[list[Path], list[int], list[int]], files: list[Path], targets: list[int], keep: list[int]
    ) -> list[int]:
        """The training indices ``keep`` with the validation images added (``train_on_val``).

        Images held out of the train folder go back; a val folder's are appended to ``files`` and ``targets`` in
        place, so the test split's indices into them stay valid and the test images are the same as without it.
        """
        val_files, val_targets, val_indices = val
        if val_files is files:
            self.origins["val"] = "none: nothing is held out of the training images (data.train_on_val=true)"
        else:
            self.origins["val"] = f"none: {self.origins['val']} trains too (data.train_on_val=true)"
            offset = len(files)
            files.extend(val_files)
            targets.extend(val_targets)
            val_indices = [offset + i for i in val_indices]
        return sorted([*keep, *val_indices])

    def stored_size(self) -> int:
        """Side of the square each image is decoded to for the in-memory path: the eval transform's resize, so
        the eval centre crop is exact and train crops have the margin around it."""
        pre = self._preprocess()
        return round(pre.image_size / pre.crop_pct)

    def _fits_in_memory(self, splits: dict[str, tuple[list[Path], list[int], list[int]]]) -> bool:
        distinct = {id(f): len(f) for f, _, _ in splits.values()}
        need = sum(distinct.values()) * self.stored_size() ** 2 * 3 / 2**30
        if need <= self.memory_limit_gb:
            return True
        log.warning(
            "data.augment_on=device: %d images at %d px need %.1f GB > data.memory_limit_gb=%.1f; streaming "
            "them from disk with %d workers and per-image PIL augmentation instead",
            sum(distinct.values()),
            self.stored_size(),
            need,
            self.memory_limit_gb,
            self.num_workers,
        )
        return False

    def _drop_corrupt(
        self, splits: dict[str, tuple[list[Path], list[int], list[int]]], bad: dict[int, dict[int, str]]
    ) -> dict[str, tuple[list[Path], list[int], list[int]]]:
        """Fail naming the undecodable files, or (``skip_corrupt``) leave them out of every split and count them."""
        found = {f[row]: why for f, _, _ in splits.values() for row, why in bad.get(id(f), {}).items()}
        if not found:
            return splits
        if not self.skip_corrupt:
            raise CorruptImagesError(describe_corrupt(found))
        self.skipped = found
        log.warning(
            "data.skip_corrupt=true: skipping %d undecodable image file(s), e.g. %s",
            len(found),
            "; ".join(f"{p} ({why})" for p, why in list(found.items())[:3]),
        )
        return {name: (f, t, [i for i in idx if i not in bad.get(id(f), {})]) for name, (f, t, idx) in splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self._splits()
        train_tf, eval_tf = self.transforms()
        in_memory = self.augment_on == "device" and self._fits_in_memory(splits)
        decoded: dict[int, Any] = {}
        bad: dict[int, dict[int, str]] = {}
        for files, _, _ in splits.values():
            if id(files) in bad:
                continue
            if in_memory:
                decoded[id(files)], bad[id(files)] = decode_cached_checked(files, cache_dir(), size=self.stored_size())
            else:
                bad[id(files)] = scan_cached(files, cache_dir())
        made: dict[str, Images] = {}
        for name, (files, targets, indices) in self._drop_corrupt(splits, bad).items():
            if in_memory:
                made[name] = TensorImages(decoded[id(files)], targets, indices)
            else:
                made[name] = FileImages(files, targets, indices, train_tf if name == "train" else eval_tf)
        self.train_set, self.val_set, self.test_set = made["train"], made.get("val"), made["test"]
        self.source = f"image folders at {self.root} ({self.layout} layout" + (
            ", decoded into memory)" if in_memory else ")"
        )

    def describe(self) -> dict[str, Any]:
        """Split sizes, origin and the undecodable files left out (``skip_corrupt``), for the run summary."""
        return super().describe() | {
            **{f"{name}_from": origin for name, origin in self.origins.items()},
            "corrupt_skipped": len(self.skipped),
            "corrupt_files": [str(p) for p in list(self.skipped)[:20]],
        }
