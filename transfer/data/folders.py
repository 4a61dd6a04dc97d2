"""The layout of a user's image folders: where the splits are, which classes they hold, and what is wrong.

Two layouts are accepted: ``root/train/<class>/*`` with optional ``val/`` (or ``validation/``) and ``test/``
beside it, and the flat ``root/<class>/*`` (no split folders; every hold-out is carved out of it). Also the
image files a command line names (:func:`collect_images`: files, folders or shell patterns).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from transfer.core.errors import ConfigError, DataNotFoundError
from transfer.core.overrides import path_specs
from transfer.data.datasets import IMAGE_EXTENSIONS, list_classes

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_LAYOUTS = (
    "data=imagefolder expects data.root to hold either train/<class>/<image> (optionally with val/ and "
    "test/ holding the same class folders) or <class>/<image> directly (val and test are then held out "
    "of it, stratified and seeded)"
)


def find_layout(root: Path) -> tuple[Path, dict[str, Path]]:
    """The training folder and the split folders found beside it.

    Args:
        root: ``data.root``.

    Returns:
        ``(train_dir, {"val": dir, "test": dir})`` with only the splits that exist; for the flat layout
        ``train_dir`` is ``root`` itself and there are no other splits.
    """
    if not root.is_dir():
        raise DataNotFoundError(f"No image folder at {root}. {_LAYOUTS}; set data.root=/path/to/your/images.")
    if (root / "train").is_dir():
        found = {
            name: next((root / n for n in names if (root / n).is_dir()), None)
            for name, names in SPLIT_FOLDERS.items()
            if name != "train"
        }
        return root / "train", {name: path for name, path in found.items() if path is not None}
    stray = [n for names in SPLIT_FOLDERS.values() for n in names if (root / n).is_dir()]
    if stray:
        raise DataNotFoundError(
            f"{root} has {', '.join(s + '/' for s in stray)} but no train/ folder. {_LAYOUTS}. Rename the training "
            f"split's folder to train/, or move the class folders up into {root} to let the splits be held out."
        )
    return root, {}


def check_classes(train_dir: Path, splits: dict[str, Path]) -> list[str]:
    """The class names (training folder's sub-folders), after checking every split has exactly the same ones.

    Raises:
        DataNotFoundError: no class folders at all.
        ConfigError: a single class, or a split with a class folder the others lack.
    """
    classes = list_classes(train_dir)
    if not classes:
        raise DataNotFoundError(f"No class folders in {train_dir}. {_LAYOUTS}; set data.root=/path/to/your/images.")
    if len(classes) < 2:
        raise ConfigError(
            f"{train_dir} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a "
            f"classifier needs at least two. {_LAYOUTS}."
        )
    for name, folder in splits.items():
        other = list_classes(folder)
        extra, missing = sorted(set(other) - set(classes)), sorted(set(classes) - set(other))
        if extra or missing:
            what = "; ".join(
                part
                for part in (
                    f"{folder} has class folder(s) {', '.join(extra)} that {train_dir} lacks" if extra else "",
                    f"it lacks {', '.join(missing)}" if missing else "",
                )
                if part
            )
            raise ConfigError(
                f"The {name} split's classes differ from the training split's: {what}. Every split must hold the "
                f"same class folders (images of a class the model never trains on cannot be scored); add or "
                f"remove class folders so that they match."
            )
    return classes


def check_not_empty(split: str, folder: Path, classes: Sequence[str], targets: Sequence[int]) -> None:
    """Refuse class folders without a single image file in them."""
    counts = [0] * len(classes)
    for t in targets:
        counts[t] += 1
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise ConfigError(
            f"The {split} split has no image files for class(es) {', '.join(empty)} (under "
            f"{', '.join(str(folder / c) for c in empty[:3])}). Add images there, or remove the class folder from "
            f"every split; only files ending in a known image extension count."
        )


def collect_images(spec: str | Sequence[str]) -> list[Path]:
    """Image files named on a command line (``images=``, ``parity.images=``), sorted, each once.

    Args:
        spec: a file, a folder (searched recursively) or a shell pattern (``*``, ``?``, ``[0-3]``; ``**``
            recurses); several of them as a list or separated by commas.

    Returns:
        The image files (known extensions only).

    Raises:
        ConfigError: a spec matched nothing.
    """
    files: set[Path] = set()
    for one in path_specs(spec):
        found = _matches(one)
        if not found:
            raise ConfigError(
                f"images={one} matches no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...). Pass a file, a "
                f"folder, a pattern such as photos/*.jpg or photos/00[0-4]?.jpg, or several: images=[a.jpg,b.jpg]."
            )
        files.update(found)
    if not files:
        raise ConfigError("images= names no files. Pass a file, a folder or a pattern such as photos/*.jpg.")
    return sorted(files)


def _matches(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    if path.is_file():
        return [path]
    return [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix.lower() in IMAGE_EXTENSIONS]
