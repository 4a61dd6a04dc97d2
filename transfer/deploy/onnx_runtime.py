"""Exported ONNX models at prediction time: onnxruntime behind the small interface predict and serve use.

An export (``python -m transfer.export``) writes ``<name>.onnx`` and, beside it, ``<name>.onnx.json`` with the
class names and preprocessing. :class:`OnnxClassifier` reads both and behaves like a
:class:`~transfer.training.module.Classifier` where :func:`transfer.deploy.predict.predict` needs it to:
``class_names``, ``preprocess``, ``to``/``eval`` and a call that maps a normalised ``(N, 3, H, W)`` batch to logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transfer.core.checkpoint_meta import check_class_names, check_preprocess, refuse
from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess

INSTALL_HINT = 'pip install -e ".[export]"'


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON written beside an exported model: its file name plus ``.json`` (``best.onnx.json``), so an ONNX
    and a TorchScript export of one checkpoint keep a description each."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    """The export's description (class names, preprocessing, parity figures).

    Args:
        model_path: the exported ``.onnx`` or ``.pt`` file.

    Returns:
        The parsed JSON.
    """
    path = sidecar_path(model_path)
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: an exported model needs the JSON that transfer.export writes beside "
            f"it (class names and preprocessing). Export again with python -m transfer.export ckpt=..."
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise refuse(path, "the file", f"cannot be read as JSON ({type(err).__name__}: {str(err)[:120]})") from err
    if not isinstance(info, dict):
        raise refuse(path, "the file", "is not a JSON object")
    return info


def preprocess_from_dict(pre: Any, where: str | Path = "the export's JSON") -> Preprocess:
    """A :class:`Preprocess` from its JSON form (lists back to tuples), every value bounded
    (:func:`~transfer.core.checkpoint_meta.check_preprocess`)."""
    return check_preprocess(pre, where)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, ``None`` = onnxruntime's default)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(f"Running an .onnx model needs onnxruntime: {INSTALL_HINT}.") from err
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise ConfigError(
            f"onnxruntime cannot load {path} ({type(err).__name__}: {str(err)[:200]}). Pass an .onnx "
            f"file written by python -m transfer.export."
        ) from err


class OnnxClassifier:
    """An exported ONNX classifier run by onnxruntime on the CPU.

    Args:
        path: the ``.onnx`` file; its ``.json`` sidecar must be beside it.
        threads: onnxruntime intra-op threads (``None``: its default).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"No ONNX model at {self.path}: pass ckpt= an .onnx file written by transfer.export.")
        info = read_sidecar(self.path)
        sidecar = sidecar_path(self.path)
        self.class_names: list[str] = check_class_names(info.get("class_names"), sidecar)
        self.preprocess: Preprocess = preprocess_from_dict(info.get("preprocess"), sidecar)
        self.session = ort_session(self.path, threads)
        self.input_name: str = self.session.get_inputs()[0].name

    def to(self, device: Any) -> OnnxClassifier:
        """onnxruntime runs this model on the CPU whatever the device; kept for the Classifier interface."""
        return self

    def eval(self) -> OnnxClassifier:
        """No training mode to leave; kept for the Classifier interface."""
        return self

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 ``(N, 3, H, W)`` array."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.logits(x.detach().cpu().float().numpy()))
