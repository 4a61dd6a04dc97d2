"""``python -m transfer.export ckpt=<checkpoint or run dir> format=onnx|torchscript [out=DIR]``

Writes the trained network (fp32, input ``(batch, 3, H, W)`` normalised RGB, output logits, batch axis dynamic)
as ``<out>/<checkpoint name>.onnx`` or ``.pt`` (TorchScript), and beside it ``<that file name>.json``: class names,
preprocessing, input/output description, provenance and the parity figures. ``out`` defaults to the run
directory's ``export/`` folder.

Before it reports success the export is checked against the PyTorch model in fp32: the same top-1 class on
every image and every probability within ``parity.atol``, on up to ``parity.count`` real images from the run's
own data (its ``config.yaml`` names the data root; test split first) or, when they cannot be found, seeded
synthetic images (``parity.images=synthetic``, or a folder/glob of your own). The first image goes through
alone and the rest as one batch, so the dynamic batch axis is exercised too. A failed check deletes the
exported file and exits with status 2.
"""

from __future__ import annotations

import json
import signal
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from transfer.core.errors import ConfigError
from transfer.core.exit_status import announce_stop, stop_signal
from transfer.core.preprocess import Preprocess
from transfer.core.provenance import code_version
from transfer.data.folders import collect_images
from transfer.data.transforms import eval_transform
from transfer.deploy.load import find_checkpoint, run_dir_of
from transfer.deploy.onnx_runtime import INSTALL_HINT, ort_session, sidecar_path
from transfer.training.module import Classifier

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
SPLITS = ("test", "val", "validation", "train")  # where the run's own images are looked for, in order


class ParityError(ConfigError):
    """The exported model does not reproduce the PyTorch model's predictions."""


@dataclass
class Parity:
    """How closely an export reproduces the PyTorch model (fp32 softmax probabilities)."""

    source: str
    images: int
    top1_agree: int
    max_abs_prob_diff: float
    mean_abs_prob_diff: float
    max_abs_logit_diff: float
    atol: float

    @property
    def passed(self) -> bool:
        """Same top-1 on every image and every probability within ``atol``."""
        return self.top1_agree == self.images and self.max_abs_prob_diff <= self.atol

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the verdict."""
        return {**asdict(self), "passed": self.passed}


def export_model(module: Classifier, fmt: str, path: Path, opset: int = 17) -> None:
    """Write ``module``'s network (fp32, CPU, eval mode) to ``path`` with a dynamic batch axis.

    Args:
        module: the trained classifier (its ``preprocess`` sets the input size).
        fmt: ``onnx`` or ``torchscript``.
        path: the output file.
        opset: ONNX opset.
    """
    net = module.model.float().cpu().eval()
    size = _preprocess(module).image_size
    example = torch.zeros(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporters announce their own deprecation
        if fmt == "onnx":
            try:
                import onnx  # noqa: F401  (torch.onnx.export needs it)
            except ImportError as err:
                raise ConfigError(f"format=onnx needs the onnx package: {INSTALL_HINT}.") from err
            torch.onnx.export(
                net,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        else:
            torch.jit.save(torch.jit.trace(net, example), str(path))


def load_exported(path: Path, fmt: str) -> Callable[[Tensor], Tensor]:
    """A function from a normalised batch to logits, running the exported file (not the PyTorch module)."""
    if fmt == "onnx":
        session = ort_session(path)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])
    scripted = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return scripted(x)

    return run


def _run_images(run_dir: Path | None) -> list[Path]:
    """Image files of the run's own data (first split found of test/val/train), or none."""
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return []
    root = OmegaConf.select(OmegaConf.load(config), "data.root", default=None)
    if not root:
        return []
    for split in SPLITS:
        folder = Path(str(root)).expanduser() / split
        if folder.is_dir():
            try:
                return collect_images(str(folder))
            except ConfigError:
                continue
    return []


def _spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files spread evenly over the sorted list (so every class folder contributes)."""
    if len(files) <= count:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]


def synthetic_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Seeded RGB images: half noise, half smooth colour gradients (both are far from the training data)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        if i % 2:
            ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 128, 3)
            array = np.broadcast_to(ramp, (size, size, 3))
        else:
            array = rng.uniform(0, 255, (size, size, 3))
        images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return images


def parity_batch(spec: str, run_dir: Path | None, pre: Preprocess, count: int) -> tuple[Tensor, str]:
    """The images the parity check runs on, preprocessed as at prediction time, and where they came from.

    Args:
        spec: ``auto`` (the run's own data, else synthetic), ``synthetic``, or a file/folder/glob.
        run_dir: the checkpoint's run directory (its ``config.yaml`` names the data), if known.
        pre: the model's preprocessing.
        count: at most this many images.

    Returns:
        A ``(N, 3, H, W)`` float32 batch and a description of its source.
    """
    files = collect_images(spec) if spec not in ("auto", "synthetic") else []
    if spec == "auto":
        files = _run_images(run_dir)
    transform = eval_transform(pre)
    if files:
        chosen = _spread(files, count)
        source = f"{len(chosen)} real images from {Path(chosen[0]).parent.parent}"
        return torch.stack([transform(Image.open(f).convert("RGB")) for f in chosen]), source
    images = synthetic_images(count, pre.native_size or round(pre.image_size / pre.crop_pct))
    return torch.stack([transform(im) for im in images]), f"{count} synthetic images (seeded noise and gradients)"


@torch.no_grad()
def check_parity(
    module: Classifier, exported: Callable[[Tensor], Tensor], batch: Tensor, atol: float, source: str = ""
) -> Parity:
    """Compare the exported model with the PyTorch one on ``batch`` (fp32, CPU).

    Args:
        module: the reference classifier.
        exported: maps a batch to logits through the export (see :func:`load_exported`).
        batch: normalised images; the first runs alone, the rest together (a second batch size).
        atol: the largest allowed absolute difference of any softmax probability.
        source: where the images came from, for the report.

    Returns:
        The :class:`Parity` figures (check ``passed``).
    """
    ref_logits = module.model.float().cpu().eval()(batch)
    chunks = [batch[:1], batch[1:]] if len(batch) > 1 else [batch]
    out_logits = torch.cat([torch.as_tensor(exported(c)).float() for c in chunks])
    ref, out = ref_logits.softmax(-1), out_logits.softmax(-1)
    diff = (ref - out).abs()
    return Parity(
        source=source,
        images=len(batch),
        top1_agree=int((ref.argmax(-1) == out.argmax(-1)).sum()),
        max_abs_prob_diff=float(diff.max()),
        mean_abs_prob_diff=float(diff.mean()),
        max_abs_logit_diff=float((ref_logits - out_logits).abs().max()),
        atol=float(atol),
    )


def _preprocess(module: Classifier) -> Preprocess:
    """The module's preprocessing record, which every export needs (its input size, the sidecar's transform)."""
    if module.preprocess is None:
        raise ConfigError("The checkpoint has no preprocessing record; it was not written by transfer.run.")
    return module.preprocess


def describe(module: Classifier, fmt: str, path: Path, ckpt: Path, opset: int, parity: Parity) -> dict[str, Any]:
    """The sidecar JSON: everything needed to feed the exported model and read its output."""
    pre = _preprocess(module)
    size = pre.image_size
    return {
        "format": fmt,
        "model_file": path.name,
        "checkpoint": str(ckpt.resolve()),
        "class_names": list(module.class_names),
        "preprocess": pre.to_dict(),
        "input": {
            "name": "input",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "values": "RGB in [0, 1], resized as preprocess says, then (x - mean) / std",
        },
        "output": {
            "name": "logits",
            "shape": ["batch", len(module.class_names)],
            "dtype": "float32",
            "probabilities": "softmax over the last axis",
        },
        "opset": opset if fmt == "onnx" else None,
        "model": module.model.meta.to_dict(),
        "parity": parity.to_dict(),
        "torch": torch.__version__,
        "code": code_version(),
    }


def export(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Export, check parity, write the sidecar; returns the exported file and the sidecar's contents.

    Raises:
        ParityError: the export disagrees with the PyTorch model (the exported file is deleted).
    """
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is not supported; use one of {', '.join(FORMATS)}.")
    ckpt = find_checkpoint(cfg.ckpt)
    module = Classifier.from_checkpoint(ckpt)
    if module.preprocess is None:
        raise ConfigError(f"{ckpt} has no preprocessing record; it was not written by transfer.run.")
    out = Path(cfg.out).expanduser() if cfg.out else run_dir_of(ckpt) / "export"
    path = out / (ckpt.stem + FORMATS[fmt])
    try:
        export_model(module, fmt, path, int(cfg.opset))
        batch, source = parity_batch(str(cfg.parity.images), run_dir_of(ckpt), module.preprocess, int(cfg.parity.count))
        parity = check_parity(module, load_exported(path, fmt), batch, float(cfg.parity.atol), source)
    except KeyboardInterrupt as stop:  # SIGINT/SIGTERM: an export whose parity was never checked is not left behind
        path.unlink(missing_ok=True)
        announce_stop(stop_signal(stop) or signal.SIGINT, f"while exporting {ckpt}; {path} was not written.")
        raise
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise ParityError(
            f"The {fmt} export of {ckpt} does not match the PyTorch model on {parity.source}: top-1 "
            f"agrees on {parity.top1_agree}/{parity.images} images, largest probability difference "
            f"{parity.max_abs_prob_diff:.2e} (allowed {parity.atol:.0e}); the file was deleted. Try "
            f"the other format or another opset (opset=...)."
        )
    info = describe(module, fmt, path, ckpt, int(cfg.opset), parity)
    sidecar_path(path).write_text(json.dumps(info, indent=1))
    return path, info
