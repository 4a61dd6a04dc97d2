"""``python -m transfer.predict ckpt=<checkpoint or run dir> images=<file, folder or glob> [topk=5] [grid=true]``

``model=<name>`` instead of ``ckpt=`` predicts with that pretrained backbone and a new, untrained head over
CIFAR-10's classes (or ``classes=a,b,c``): the source material's "before training" demo.

``ckpt=`` may also name an exported ``.onnx`` file (``python -m transfer.export``): onnxruntime runs it, with the
class names and preprocessing of the JSON beside it.

Top-k class names and probabilities for new images, from a checkpoint alone: it carries the architecture,
class names, input size and normalisation. Results are printed as a table and written as CSV and JSON (and a
PNG grid with ``grid=true``) into a new folder, ``outputs/predictions/<time>/`` unless ``out=`` says otherwise.
"""
from __future__ import annotations

import csv
import glob
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image

from transfer.data.datasets import IMAGE_EXTENSIONS
from transfer.data.cifar import CIFAR10_CLASSES
from transfer.data.transforms import eval_transform, resolve_preprocess
from transfer.errors import ConfigError, report_errors
from transfer.module import Classifier

CIFAR_SIZE = 32
DEFAULTS = {"ckpt": None, "model": None, "classes": None, "images": None, "topk": 5, "batch_size": 64, "grid": False, "out": None, "device": "auto"}


def find_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or the best (else last) checkpoint of a run directory."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    found = best[-1:] or sorted(folder.glob("last*.ckpt"))
    if not found:
        raise ConfigError(f"No checkpoint at {path}: pass ckpt= a .ckpt file or a run directory that has "
                          f"checkpoints/best-*.ckpt or checkpoints/last.ckpt.")
    return found[0]


def collect_images(spec: str) -> list[Path]:
    """Image files named by a file, a folder (searched recursively) or a glob pattern, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ConfigError(f"images={spec} matches no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...). Pass "
                          f"a file, a folder or a quoted glob such as 'photos/*.jpg'.")
    return sorted(files)


def pick_device(name: str) -> torch.device:
    """``auto`` means the GPU when there is one, else the CPU; anything else is a torch device name."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def load_classifier(path: str | Path) -> Any:
    """A trained model from a checkpoint or run directory, or from an exported ``.onnx`` file.

    Args:
        path: a ``.ckpt``, a run directory, or an ``.onnx`` written by ``transfer.export``.

    Returns:
        A :class:`Classifier` (via ``from_checkpoint``, ``weights_only``) or an
        :class:`~transfer.onnx_runtime.OnnxClassifier`; both work with :func:`predict`.
    """
    if Path(path).suffix.lower() == ".onnx":
        from transfer.onnx_runtime import OnnxClassifier

        return OnnxClassifier(path)
    return Classifier.from_checkpoint(find_checkpoint(path))


@torch.no_grad()
def predict(module: Classifier, files: list[Path], topk: int = 5, batch_size: int = 64,
            device: str = "auto") -> list[dict[str, Any]]:
    """Classify image files with a trained module.

    Args:
        module: from :func:`load_classifier` (a Classifier or an ONNX model; its ``preprocess`` decides the
            transform).
        files: image paths.
        topk: how many classes to report per image.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        One dict per image: ``image``, ``label`` (top-1), ``prob``, ``topk`` (list of [class, prob]) and
        ``true`` (the parent folder's name when it is one of the classes, else ``None``).
    """
    pre = module.preprocess
    if pre is None:
        raise ConfigError("The checkpoint has no preprocessing record; it was not written by transfer.run.")
    transform = eval_transform(pre)
    dev = pick_device(device)
    module = module.to(dev).eval()
    names = module.class_names
    k = min(topk, len(names))
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in chunk]).to(dev)
        probs = module(batch).softmax(dim=-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for f, v, i in zip(chunk, values, indices):
            top = [[names[j], round(float(p), 6)] for p, j in zip(v, i)]
            results.append({"image": str(f), "label": top[0][0], "prob": top[0][1], "topk": top,
                            "true": f.parent.name if f.parent.name in names else None})
    return results


def untrained(name: str, classes: str | None = None) -> Classifier:
    """A pretrained backbone with a new head that has seen no data (its predictions are guesses)."""
    names = [c.strip() for c in classes.split(",")] if classes else list(CIFAR10_CLASSES)
    module = Classifier({"name": name}, names, {"_target_": "torch.optim.Adam"})
    module.preprocess = resolve_preprocess(module.model.meta, None, CIFAR_SIZE)
    return module


def write_results(results: list[dict[str, Any]], out: Path) -> None:
    """``predictions.json`` and ``predictions.csv`` (one row per image, top-k flattened)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(results, indent=1))
    k = len(results[0]["topk"])
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "true"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("class", "prob")])
        for r in results:
            writer.writerow([r["image"], r["true"] or ""] + [x for pair in r["topk"] for x in pair])


def print_table(results: list[dict[str, Any]], limit: int = 50) -> None:
    """A readable table of the first ``limit`` predictions."""
    width = min(60, max(len(Path(r["image"]).name) for r in results))
    for r in results[:limit]:
        others = ", ".join(f"{c} {p:.2f}" for c, p in r["topk"][1:3])
        mark = "" if r["true"] is None else (" ok" if r["true"] == r["label"] else f" (true: {r['true']})")
        print(f"{Path(r['image']).name[:width]:<{width}}  {r['label']:<14} {r['prob']:.3f}  [{others}]{mark}")
    if len(results) > limit:
        print(f"... {len(results) - limit} more in the CSV/JSON")


@report_errors
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry (``key=value`` arguments, as in Hydra)."""
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv))
    if not (cfg.ckpt or cfg.model) or not cfg.images:
        raise ConfigError("Usage: python -m transfer.predict ckpt=<checkpoint, run dir or exported .onnx> "
                          "images=<file, folder or glob> [topk=5] [grid=true] [out=DIR] [device=auto]; or model=<name> instead of ckpt= for "
                          "a pretrained backbone with an untrained head.")
    module = load_classifier(cfg.ckpt) if cfg.ckpt else untrained(cfg.model, cfg.classes)
    results = predict(module, collect_images(str(cfg.images)), int(cfg.topk), int(cfg.batch_size), str(cfg.device))
    out = Path(cfg.out or f"outputs/predictions/{datetime.now():%Y-%m-%d_%H-%M-%S-%f}")
    write_results(results, out)
    if cfg.grid:
        from transfer.plots import image_grid

        image_grid([r["image"] for r in results], [f"{r['label']} {r['prob']:.2f}" for r in results],
                   [r["true"] for r in results], out / "predictions.png")
    print_table(results)
    print(f"\n{len(results)} images; results in {out}")
    return results


if __name__ == "__main__":
    main()
