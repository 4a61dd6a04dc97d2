"""Checkpoints written atomically: a crash or a kill mid-write never leaves a broken ``last.ckpt``.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` serialises into memory and then writes the
target file in place, so a process killed during that write leaves a truncated file under the real name.
:class:`AtomicCheckpointIO` writes to a temporary file in the same directory, flushes and fsyncs it, and renames
it over the target with :func:`os.replace` (atomic on POSIX and Windows within one file system); the directory
is fsynced too, so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s directory and an atomic rename.

    Args:
        obj: anything :func:`torch.save` takes.
        path: the final file; its directory is created when missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600; give the file the mode open() would
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist a rename inside ``folder`` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin saving local checkpoints with :func:`atomic_torch_save`.

    Remote paths (``s3://`` and other fsspec URLs) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
