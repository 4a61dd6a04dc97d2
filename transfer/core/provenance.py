"""Which code and library versions produced a result, saved beside every run and in every checkpoint."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "torchvision", "lightning", "timm", "torchmetrics", "hydra-core")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Git commit (and whether the tree had uncommitted changes), package version and library versions."""
    from transfer import __version__

    status = _git("status", "--porcelain", "--untracked-files=no")
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "transfer": __version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "packages": versions,
    }


def state_digest(tensors: dict[str, Any]) -> str:
    """sha1 over the names, shapes, dtypes and bytes of a state dict: equal digests mean bit-equal weights
    (and BatchNorm buffers). Used to key cached features and to compare DDP ranks."""
    import torch

    digest = hashlib.sha1()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
