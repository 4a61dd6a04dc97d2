"""Environment faults while writing (a full disk, a read-only folder, a path through a file) as one paragraph.

Such an ``OSError`` says nothing about the code: the run cannot write where it was told to. :func:`write_fault`
recognises one (also where a library wrapped it, as ``torch.save`` does in a ``RuntimeError`` about an
"unexpected pos") and turns it into a :class:`DiskError` naming the path and what to do; the commands print it
and exit with status 2 like any refused input.
"""

from __future__ import annotations

import errno
from pathlib import Path

from transfer.core.errors import TransferError

# errno -> (what happened, what to do); {where} is the folder, {setting} the setting that chose it.
_FAULTS = {
    errno.ENOSPC: (
        "the disk is full",
        "Free space there (df -h {where}), or choose another {setting} on a disk with room",
    ),
    errno.EDQUOT: ("the disk quota is used up", "Free space in your quota, or choose another {setting}"),
    errno.EROFS: ("the file system is read-only", "Choose another {setting} on a writable disk"),
    errno.EACCES: ("permission is denied", "Make {where} writable for this user, or choose another {setting}"),
    errno.EPERM: ("the operation is not permitted", "Make {where} writable for this user, or choose another {setting}"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Choose another {setting}, or move that file away"),
    errno.EEXIST: ("a file stands where a folder must be made", "Choose another {setting}, or move that file away"),
}


class DiskError(TransferError):
    """A file could not be written for a reason of the machine, not of the code (full, read-only, not a folder)."""


def _os_error(err: BaseException | None) -> OSError | None:
    """The first ``OSError`` of a known environment fault in ``err``'s chain (cause, then context)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in _FAULTS:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def write_fault(
    err: BaseException, path: str | Path, setting: str = "hydra.run.dir=", kept: str = ""
) -> DiskError | None:
    """The :class:`DiskError` for ``err`` when it is an environment fault while writing ``path``, else ``None``.

    Args:
        err: what the write raised.
        path: what was being written (the error's own file name is preferred when it has one).
        setting: the setting that chose the location, for the advice (``hydra.run.dir=``, ``out=``).
        kept: what is still intact, said at the end (``the previous last.ckpt is unchanged``).

    Returns:
        The error to raise (``from err``), or ``None`` when ``err`` is something else.
    """
    if isinstance(err, TransferError):  # already said in the project's words (a DiskError from deeper down)
        return None
    found = _os_error(err)
    if found is None and isinstance(err, RuntimeError) and "unexpected pos" in str(err):
        found = OSError(errno.ENOSPC, "the write stopped short")  # torch's stream writer hides the OSError
    if found is None:
        return None
    what, fix = _FAULTS[int(found.errno or errno.ENOSPC)]
    where = Path(str(found.filename or path))
    folder = where if where.is_dir() else where.parent
    tail = f" {kept[0].upper()}{kept[1:]}." if kept else ""
    return DiskError(
        f"Cannot write {where}: {what} ({found.strerror or found}). {fix.format(where=folder, setting=setting)}.{tail}"
    )
