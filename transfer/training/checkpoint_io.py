"""Checkpoints written atomically: a crash or a kill mid-write never leaves a broken ``last.ckpt``.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` serialises into memory and then writes the
target file in place, so a process killed during that write leaves a truncated file under the real name.
:class:`AtomicCheckpointIO` writes to a temporary file in the same directory, flushes and fsyncs it, and renames
it over the target with :func:`os.replace` (atomic on POSIX and Windows within one file system); the directory
is fsynced too, so the rename itself survives a power cut.

A write that fails (a full disk, a read-only folder) removes its temporary file and leaves the previous file
under the real name as it was; the failure is a :class:`~transfer.core.disk.DiskError`, one paragraph naming the
path. A process killed mid-write cannot clean up: its temporary file (``.<name>.<pid>.<random>.tmp``, hidden)
stays behind, and :func:`remove_orphans` deletes those of processes that no longer run when the next run or
resume starts in that folder.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transfer.core.disk import write_fault

log = logging.getLogger(__name__)
_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # .<name>.<pid>.<random>.tmp, as atomic_torch_save names it


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s directory and an atomic rename.

    Args:
        obj: anything :func:`torch.save` takes.
        path: the final file; its directory is created when missing.

    Raises:
        DiskError: the disk is full, the folder read-only or the path runs through a file; the previous file at
            ``path`` is unchanged and no temporary file is left.
    """
    target = Path(path)
    try:
        _write_atomically(obj, target)
    except Exception as err:
        fault = write_fault(err, target, kept=f"the previous {target.name}, if any, is unchanged")
        if fault is not None:
            raise fault from err
        raise
    _fsync_dir(target.parent)


def _write_atomically(obj: Any, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
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


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (those of processes no longer running).

    Args:
        folder: a checkpoint folder; a missing one is fine.

    Returns:
        The files removed (each is also logged).
    """
    removed = []
    for path in folder.glob(".*.tmp") if folder.is_dir() else ():
        found = _TEMP.match(path.name)
        if found is None or _running(int(found.group(1))):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        log.info("removed %s, left by an interrupted checkpoint write", path)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary file of a live writer is never removed)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


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
