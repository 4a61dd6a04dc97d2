"""``python -m transfer.predict ckpt=<checkpoint or run dir> images=<file, folder or glob> [topk=5] [grid=true]``

``model=<name>`` instead of ``ckpt=`` predicts with that pretrained backbone and a new, untrained head over
CIFAR-10's classes (or ``'classes=[a,b,c]'``): the source material's "before training" demo.

``ckpt=`` may also name an exported ``.onnx`` file (``python -m transfer.export``): onnxruntime runs it, with the
class names and preprocessing of the JSON beside it.

Top-k class names and probabilities for new images, from a checkpoint alone: it carries the architecture,
class names, input size and normalisation. Results are printed as a table and written as CSV and JSON (and a
PNG grid with ``grid=true``) into a new folder, ``outputs/predictions/<time>/`` unless ``out=`` says otherwise.
The settings and their defaults are ``conf/tools/predict.yaml`` (``--help`` lists them).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from transfer.core.errors import ConfigError
from transfer.data.cifar import CIFAR10_CLASSES
from transfer.data.transforms import eval_transform
from transfer.models import model_preprocess
from transfer.training.compute import pick_device
from transfer.training.module import Classifier

CIFAR_SIZE = 32
USAGE = (
    "python -m transfer.predict ckpt=<checkpoint, run dir or exported .onnx> images=<file, folder or glob> "
    "[topk=5] [grid=true] [out=DIR] [device=auto]; or model=<name> instead of ckpt= for a pretrained backbone "
    "with an untrained head"
)


@torch.no_grad()
def predict(
    module: Classifier, files: list[Path], topk: int = 5, batch_size: int = 64, device: str = "auto"
) -> list[dict[str, Any]]:
    """Classify image files with a trained module.

    A plain loop rather than ``Trainer.predict`` (which ``transfer.evaluate`` uses): the same function serves an
    onnxruntime session, which is no LightningModule, and a few files need no progress bar.

    Args:
        module: from :func:`~transfer.deploy.load.load_classifier` (a Classifier or an ONNX model; its
            ``preprocess`` decides the transform).
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
        chunk = files[start : start + batch_size]
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in chunk]).to(dev)
        probs = module(batch).softmax(dim=-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for f, v, i in zip(chunk, values, indices):
            top = [[names[j], round(float(p), 6)] for p, j in zip(v, i)]
            results.append(
                {
                    "image": str(f),
                    "label": top[0][0],
                    "prob": top[0][1],
                    "topk": top,
                    "true": f.parent.name if f.parent.name in names else None,
                }
            )
    return results


def untrained(model: dict[str, Any], classes: list[str] | str | None = None) -> Classifier:
    """A pretrained backbone with a new head that has seen no data (its predictions are guesses).

    Args:
        model: the ``model=`` group's settings; ``name``, ``pretrained`` and ``weights`` are used (the stem is
            adapted to CIFAR-10's 32 px, as ``create_model``'s default ``adapt`` does).
        classes: the head's class names (a list, or one comma-separated string); ``None``: CIFAR-10's.
    """
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes or CIFAR10_CLASSES)
    chosen = {k: model[k] for k in ("name", "pretrained", "weights") if k in model}
    preprocess = model_preprocess(chosen["name"], "native", None, CIFAR_SIZE)  # the weights' input for 32 px data
    return Classifier(chosen, names, {"_target_": "torch.optim.Adam"}, preprocess=preprocess.to_dict())


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
