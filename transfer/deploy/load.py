"""Finding and loading a trained model: what every tool that takes ``ckpt=`` shares.

``ckpt=`` may name a ``.ckpt`` file, a run directory (its best checkpoint, else its last) or, where a tool
accepts it, an exported ``.onnx`` file. Kept here, not in one of the command-line tools, so that the tools
(``predict``, ``evaluate``, ``export``, ``serve``, ``residuals``) import a library module and not each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer.core.errors import ConfigError


def find_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or the best (else last) checkpoint of a run directory.

    Args:
        path: a checkpoint file, a run directory, or its ``checkpoints/`` folder.

    Returns:
        The checkpoint file: ``path`` itself when it is a file, else the best of the ``best*.ckpt`` (by the
        validation score each records under ``selection``; where scores are missing or equal, the newest: a resumed
        run copies its earlier best beside the new ones), else ``last*.ckpt``.

    Raises:
        ConfigError: no checkpoint there.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    if len(best) > 1:  # checkpoint.keep > 1
        best = sorted(best, key=_selection_rank)
    found = best[-1:] or sorted(folder.glob("last*.ckpt"))
    if not found:
        raise ConfigError(
            f"No checkpoint at {path}: pass ckpt= a .ckpt file or a run directory that has "
            f"checkpoints/best-*.ckpt or checkpoints/last.ckpt."
        )
    return found[0]


def _selection_rank(path: Path) -> tuple[bool, float, float]:
    """Sort key of a best checkpoint: its recorded validation score (higher is better for ``mode=max``), then its
    modification time. The file is memory-mapped with ``weights_only``: no tensor is read, no code runs."""
    import torch

    try:
        selection = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("selection") or {}
    except Exception:  # an unreadable file ranks last; loading it later says what is wrong with it
        selection = {}
    score = selection.get("score")
    if not isinstance(score, (int, float)):
        return False, 0.0, path.stat().st_mtime
    return True, float(score) if selection.get("mode", "max") == "max" else -float(score), path.stat().st_mtime


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_classifier(path: str | Path) -> Any:
    """A trained model from a checkpoint or run directory, or from an exported ``.onnx`` file.

    Args:
        path: a ``.ckpt``, a run directory, or an ``.onnx`` written by ``transfer.export``.

    Returns:
        A :class:`~transfer.training.module.Classifier` (via ``from_checkpoint``, ``weights_only``) or an
        :class:`~transfer.deploy.onnx_runtime.OnnxClassifier`; both work with :func:`transfer.deploy.predict.predict`.
    """
    if Path(path).suffix.lower() == ".onnx":
        from transfer.deploy.onnx_runtime import OnnxClassifier  # onnxruntime is an optional extra

        return OnnxClassifier(path)
    from transfer.training.module import Classifier  # torch and Lightning: only when a checkpoint is really loaded

    return Classifier.from_checkpoint(find_checkpoint(path))
