"""``python -m transfer.evaluate ckpt=<checkpoint or run dir> [data=...] [split=test]``: the evaluate-only path.

The data are the run's own: a run directory keeps the resolved config it trained with (``config.yaml`` beside
``checkpoints/``), and its ``data`` node (root, val_size, split_seed...) rebuilds the very validation split the
run selected its checkpoint on; ``data.<key>=`` overrides apply on top, and ``data=<group>`` replaces it.

Writes into a new directory: ``metrics.json`` (accuracy, per-class accuracy, precision/recall/F1),
``report.md`` (the classification report), ``confusion_matrix.png`` and ``top_losses.png`` (the images the
model got most confidently wrong). ``limit=`` scores a seeded, class-stratified subset (a count or a fraction of the
split); both reports say how many images were scored out of the split's size.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from transfer.core.errors import ConfigError
from transfer.core.escape import markdown
from transfer.core.exit_status import STOPPED_BY, Stopped, announce_stop, defer_stops, pending_stop
from transfer.core.plots import confusion_matrix_figure, image_grid
from transfer.core.preprocess import Preprocess
from transfer.data import ClassificationData, datamodule_from_config, stratified_split
from transfer.deploy.load import find_checkpoint, run_dir_of
from transfer.training.compute import pick_device
from transfer.training.module import Classifier, Scores

log = logging.getLogger(__name__)


def collect(
    module: Classifier, datamodule: ClassificationData, device: str = "auto", precision: str = "32-true"
) -> tuple[Tensor, Tensor]:
    """Logits and targets over ``datamodule``'s ``predict_split``, through ``Trainer.predict``.

    Lightning's loop brings the device placement, the data module's batch preparation, inference mode and a
    progress bar; the module's ``predict_step`` applies flip TTA when its ``tta`` is on.

    Args:
        module: the classifier.
        datamodule: built with the module's preprocessing and the split to score as ``predict_split``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.
        precision: Lightning precision of the forward passes (the run's ``trainer.precision`` reproduces its test).

    Returns:
        ``(logits, targets)`` on the CPU, in the split's order.
    """
    try:
        accelerator, devices = ("auto", 1) if device == "auto" else _accelerator(pick_device(device))
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=True,
            callbacks=[TQDMProgressBar(refresh_rate=1)],  # every batch: a CPU batch of 256 images takes seconds
            precision=precision,  # type: ignore[arg-type]  # any string: Lightning validates it, caught below
        )
    except (RuntimeError, ValueError, MisconfigurationException) as err:  # RuntimeError: torch.device's
        raise ConfigError(
            f"device={device} precision={precision} cannot be used here ({str(err)[:200]}). Use "
            f"device=auto|cpu|cuda and precision=32-true|bf16-mixed|16-mixed (mixed ones on a "
            f"GPU)."
        ) from err
    scores = cast(list[Scores], trainer.predict(module, datamodule=datamodule))  # predict_step's, one per batch
    targets = [s.target.cpu() for s in scores if s.target is not None]
    if len(targets) != len(scores):
        raise ConfigError(f"The {datamodule.predict_split} split has no labels to score against; use split=test|val.")
    return torch.cat([s.logits.float().cpu() for s in scores]), torch.cat(targets)


def _accelerator(device: torch.device) -> tuple[str, Any]:
    """Lightning's ``(accelerator, devices)`` for one torch device."""
    return ("gpu", [device.index or 0]) if device.type == "cuda" else (device.type, 1)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Accuracy, confusion matrix and per-class precision/recall/F1/support, through torchmetrics.

    A class never predicted gets precision 0 and one absent from ``targets`` recall 0 (``zero_division=0``).
    ``macro_f1`` is the plain mean over all classes: torchmetrics' ``average="macro"`` would skip classes
    absent from both targets and predictions, which would change the number this report has always given.

    Args:
        logits: ``(N, C)`` scores.
        targets: ``(N,)`` true class indices.
        classes: class names.

    Returns:
        A JSON-ready dict; ``confusion`` rows are true classes, columns predictions.
    """
    n = len(classes)
    pred = logits.argmax(dim=1)
    confusion = multiclass_confusion_matrix(pred, targets, n)
    scores = {
        name: fn(pred, targets, n, average=None, zero_division=0)
        for name, fn in (
            ("precision", multiclass_precision),
            ("recall", multiclass_recall),
            ("f1", multiclass_f1_score),
        )
    }
    support = confusion.sum(dim=1)
    per_class = {
        c: {**{name: float(values[i]) for name, values in scores.items()}, "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    return {
        "accuracy": float((pred == targets).float().mean()),
        "n": len(targets),
        "loss": float(F.cross_entropy(logits, targets)),
        "per_class": per_class,
        "macro_f1": float(scores["f1"].mean()),
        "confusion": confusion.tolist(),
    }


def report_markdown(metrics: dict[str, Any], title: str) -> str:
    """The classification report as a Markdown table."""
    lines = [
        f"# {markdown(title)}",
        "",
        f"accuracy **{metrics['accuracy']:.4f}** on {_scored(metrics)}{_weights(metrics)}, "
        f"loss {metrics['loss']:.4f}, macro F1 {metrics['macro_f1']:.4f}",
        "",
        "| class | precision | recall (class accuracy) | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {markdown(c)} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for c, m in metrics["per_class"].items()
    ]
    return "\n".join(lines) + "\n"


def _scored(metrics: dict[str, Any]) -> str:
    """``12 images``, or ``50 of the split's 10000 images (a class-stratified subset ...)`` for a ``limit=``."""
    size = metrics.get("split_size")
    if size is None or size == metrics["n"]:
        return f"{metrics['n']} images" + (" (every image of the split)" if size is not None else "")
    return f"{metrics['n']} of the split's {size} images ({metrics.get('scored', 'a subset')})"


def _weights(metrics: dict[str, Any]) -> str:
    """`` with the live weights`` where those were scored beside an EMA (``weights=live``); else nothing."""
    return " with the live weights (weights=live)" if metrics.get("weights") == "live" else ""


def _raw_image(dataset: Any, i: int, pre: Preprocess) -> np.ndarray:
    x, _ = dataset[i]
    if x.dtype == torch.uint8:  # the in-memory path stores the image itself
        return x.permute(1, 2, 0).numpy()
    return (pre.denormalize(x).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def data_config(cfg: DictConfig, ckpt: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``data`` node to evaluate ``ckpt`` on: its run's own, with the command line's ``data.*`` on top.

    Args:
        cfg: the composed ``conf/tools/evaluate.yaml`` (its ``data`` holds the command line's values).
        ckpt: the checkpoint file; its run's ``config.yaml`` is looked for beside ``checkpoints/``.
        overrides: the command line's overrides (Hydra's task overrides); those of ``data.<key>`` are applied to
            the run's node, and a ``data=<group>`` one means the composed node is wanted instead.

    Returns:
        The ``data`` node for :func:`~transfer.data.datamodule_from_config`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if any(o.key_or_group == "data" for o in parsed):
        return cfg.data  # the user chose another data group: the run's is not wanted
    run_config = run_dir_of(ckpt) / "config.yaml"
    recorded = OmegaConf.load(run_config) if run_config.is_file() else None
    node = recorded.get("data") if isinstance(recorded, DictConfig) else None
    if not isinstance(node, DictConfig):
        log.info("%s has no run data config: evaluating on the data config composed here", run_config)
        return cfg.data
    applied = _apply_data_overrides(node, cfg, parsed)
    log.info("data: the run's own (%s)%s", run_config, f", with {', '.join(applied)}" if applied else "")
    return node


def _apply_data_overrides(node: DictConfig, cfg: DictConfig, parsed: Sequence[Any]) -> list[str]:
    """Put the command line's ``data.<key>`` values (as Hydra parsed them into ``cfg``) into ``node``."""
    applied = []
    for override in parsed:
        dotted = str(override.key_or_group)
        if not dotted.startswith("data."):
            continue
        key = dotted.removeprefix("data.")
        if override.is_delete():
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(node, parent_key) if parent_key else node
            if isinstance(parent, DictConfig) and leaf in parent:
                del parent[leaf]
        else:
            OmegaConf.update(node, key, OmegaConf.select(cfg, dotted), merge=False, force_add=True)
        applied.append(override.input_line or dotted)
    return applied


def check_limit(limit: Any) -> int | float | None:
    """``limit=`` as given, if it is a whole count of images (>= 1) or a fraction in (0, 1]; ``None``: every image.

    Raises:
        ConfigError: anything else (a bool, 0, a negative number, a fraction above 1, text).
    """
    if limit is None:
        return None
    whole = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    fraction = isinstance(limit, float) and 0 < limit <= 1
    if not (whole or fraction):
        raise ConfigError(
            f"limit={limit!r} must be a whole number of images (limit=500) or a fraction of the split in (0, 1] "
            f"(limit=0.1); limit=null scores every image. Nothing was loaded or written."
        )
    return limit


def check_weights(weights: Any) -> str:
    """``weights=`` as given, if it is ``ema`` (what the run tested) or ``live`` (the weights as trained).

    Raises:
        ConfigError: anything else.
    """
    if weights not in ("ema", "live"):
        raise ConfigError(
            f"weights={weights!r} must be ema (the averaged weights the run validated and tested; a checkpoint "
            f"without an EMA holds only its trained ones) or live (the weights as trained, beside their EMA in "
            f"the checkpoint). Nothing was loaded or written."
        )
    return str(weights)


def limit_split(datamodule: ClassificationData, limit: int | float | None, seed: int) -> tuple[int, int, str]:
    """Cut the data module's ``predict_split`` to ``limit`` images: a seeded subset, stratified by class.

    Args:
        datamodule: the data module (set up here; Lightning's own ``setup`` then keeps what it holds).
        limit: a count, a fraction of the split, or ``None`` for every image.
        seed: the subset's seed (the same seed scores the same images).

    Returns:
        ``(scored, split_size, how)``: the images that will be scored, the split's size, and a phrase saying which.
    """
    datamodule.setup("predict")
    name = f"{datamodule.predict_split}_set"
    dataset = getattr(datamodule, name)
    size = len(dataset)
    count = size if limit is None else min(size, limit if isinstance(limit, int) else max(1, round(limit * size)))
    if count >= size:
        return size, size, "every image"
    indices = np.asarray(dataset.indices)
    labels = np.asarray(dataset.targets)[indices]
    chosen = np.sort(stratified_split(labels, count, seed)[1])
    limited = copy.copy(dataset)
    limited.indices = indices[chosen]
    setattr(datamodule, name, limited)
    return len(chosen), size, f"a class-stratified subset drawn with limit_seed={seed}"


def evaluate(cfg: DictConfig, out: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate a checkpoint on a data split and write the report files into ``out``.

    The report files are written only once every image is scored: a stop (SIGINT, SIGTERM) while scoring leaves
    none of them, and one arriving while they are written waits until they all are.

    Args:
        cfg: the composed ``conf/tools/evaluate.yaml``.
        out: the output directory.
        overrides: the command line's overrides (see :func:`data_config`).

    Returns:
        The metrics written to ``metrics.json``.
    """
    limit = check_limit(cfg.get("limit"))
    weights = check_weights(cfg.get("weights", "ema"))
    ckpt = find_checkpoint(cfg.ckpt)  # once: a run still writing checkpoints must not change it mid-way
    module = Classifier.from_checkpoint(ckpt, live=weights == "live")
    if module.preprocess is None:
        raise ConfigError(f"{ckpt} has no preprocessing record; it was not written by transfer.run.")
    if str(cfg.split) == "val" and module.trained_on_val:
        raise ConfigError(
            f"split=val: {ckpt} trained on its validation images (data.train_on_val=true), so it has no "
            f"validation split to score, whatever data config is given. Evaluate split=test (its own test images, "
            f"or another folder's with data.root=<folder>)."
        )
    if cfg.get("tta") is not None:  # null keeps what the run tested with
        module.hparams["tta"] = bool(cfg.tta)
    # the checkpoint's preprocessing, exactly as the run used it: nothing is resolved again here
    node = data_config(cfg, ckpt, overrides)
    datamodule = datamodule_from_config(node, module.preprocess, predict_split=str(cfg.split))
    if datamodule.classes != module.class_names:
        raise ConfigError(
            f"The checkpoint's classes {module.class_names} differ from the data's {datamodule.classes} "
            f"(data.root={datamodule.root}); evaluate on data with the same class folders."
        )
    scored, size, how = limit_split(datamodule, limit, int(cfg.get("limit_seed", 0)))
    log.info("scoring %d of the %d %s images (%s), %s weights", scored, size, cfg.split, how, module.loaded_weights)
    logits, targets = collect(module, datamodule, str(cfg.device), str(cfg.get("precision", "32-true")))
    metrics = {
        **classification_metrics(logits, targets, module.class_names),
        "split_size": size,
        "scored": how,
        "weights": module.loaded_weights,  # live where the checkpoint has no EMA, whatever was asked
    }
    defer_stops(True)  # all the reports or none: a signal now waits for the last file
    try:
        _write_reports(cfg, out, ckpt, module, datamodule, metrics, logits, targets)
    finally:
        defer_stops(False)
    signum = pending_stop()
    if signum is not None:
        STOPPED_BY["announced"] = signum
        announce_stop(signum, f"after the reports were written (outputs in {out})")
        raise Stopped(signum)
    return metrics


def _write_reports(
    cfg: DictConfig,
    out: Path,
    ckpt: Path,
    module: Classifier,
    datamodule: ClassificationData,
    metrics: dict[str, Any],
    logits: Tensor,
    targets: Tensor,
) -> None:
    """``metrics.json``, ``report.md``, the confusion matrix and the top-losses grid."""
    assert module.preprocess is not None  # evaluate() refused a checkpoint without one
    out.mkdir(parents=True, exist_ok=True)
    title = f"{module.model.meta.name} on {cfg.split} ({datamodule.source})"
    (out / "metrics.json").write_text(json.dumps({"ckpt": str(ckpt), **metrics}, indent=1))
    (out / "report.md").write_text(report_markdown(metrics, title))
    confusion_matrix_figure(np.array(metrics["confusion"]), module.class_names, out / "confusion_matrix.png", title)
    losses = F.cross_entropy(logits, targets, reduction="none")
    worst = losses.argsort(descending=True)[: int(cfg.top_losses)].tolist()
    probs = logits.softmax(dim=1)
    names = module.class_names
    dataset = getattr(datamodule, f"{cfg.split}_set")
    image_grid(
        [_raw_image(dataset, i, module.preprocess) for i in worst],
        [f"{names[int(probs[i].argmax())]} {float(probs[i].max()):.2f}" for i in worst],
        [names[int(targets[i])] for i in worst],
        out / "top_losses.png",
    )
