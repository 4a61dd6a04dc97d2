"""One training run from a composed config: data, model, staged fine-tuning, test of the best checkpoint.

:func:`train` is the library entry; ``python -m transfer.run`` is a thin Hydra wrapper around it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transfer.core.errors import ConfigError
from transfer.core.plots import plot_epoch_curves, plot_step_loss
from transfer.core.preprocess import Preprocess
from transfer.core.provenance import code_version
from transfer.core.quiet import quiet
from transfer.data import ClassificationData, datamodule_from_config
from transfer.models import count_parameters, model_preprocess, resolve_adapt
from transfer.training.budget import budget_planner
from transfer.training.budget_config import budgeted_config
from transfer.training.checkpoint_io import AtomicCheckpointIO
from transfer.training.compute import apply_compute, resolve_precision
from transfer.training.distributed import weights_in_sync
from transfer.training.features import CachedFeatureData, FeatureCache
from transfer.training.finetune import StagedFinetuning
from transfer.training.history import History
from transfer.training.module import Classifier
from transfer.training.preflight import check_fresh
from transfer.training.progress import FitSummary, TimedProgressBar
from transfer.training.requeue import SlurmRequeue
from transfer.training.resume import EpochCheckpoint, RunState
from transfer.training.stops import GracefulStop, Stopped, announce_untested, stoppable, writing_outputs
from transfer.training.tensorboard import TensorBoardExtras, log_hparams

log = logging.getLogger(__name__)
quiet()  # again, now that Lightning is imported: its console handler must not repeat the root's lines


def check_input_size(module: Classifier, size: int) -> None:
    """Fail before training, with a clear message, if the (adapted) model cannot take ``size`` px inputs."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as err:
        meta = module.model.meta
        raise ConfigError(
            f"Model {meta.name} with model.adapt={meta.adapt} cannot take {size} px inputs "
            f"({str(err).splitlines()[0][:160]}). Use data.image_size=32 with adapt=native (transformers are adapted "
            f"for 32 px), or model.adapt=resize to feed the pretrained {meta.input_size} px."
        ) from err
    finally:
        module.train(was_training)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The ``logger`` group's entries, each writing under ``run_dir``.

    Args:
        cfg: the composed config.
        run_dir: the run directory (every logger's ``save_dir``).

    Returns:
        The loggers (TensorBoard by default).
    """
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or not node.get("_target_"):
            continue
        try:
            loggers.append(instantiate(node, save_dir=str(run_dir)))
        except (ImportError, InstantiationException) as err:
            raise ConfigError(
                f"logger.{name} could not be created ({str(err).splitlines()[-1][:200]}). If it needs "
                f"a package that is not installed, install it (pip install mlflow, pip install wandb); "
                f"or drop the logger with ~logger.{name}."
            ) from err
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """A Lightning Trainer with the ``trainer`` group as its arguments and the ``logger`` group's loggers."""
    logger = build_loggers(cfg, run_dir)
    args: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    args["precision"] = resolve_precision(args.get("precision", "auto"), args.get("accelerator"))
    if OmegaConf.select(cfg, "data.train_on_val"):
        args["limit_val_batches"] = 0  # no split is left to validate on
    if OmegaConf.select(cfg, "finetune.cache_features"):
        # the loaders switch from cached features to images at the unfreeze epoch
        args.setdefault("reload_dataloaders_every_n_epochs", 1)
    try:
        # AtomicCheckpointIO: temp file + fsync + rename, so a kill mid-write never leaves a broken last.ckpt
        plugins = [*(args.pop("plugins", None) or []), AtomicCheckpointIO()]
        return L.Trainer(**args, default_root_dir=str(run_dir), logger=logger, callbacks=callbacks, plugins=plugins)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"The trainer settings {args} were rejected by lightning.Trainer: {err}") from err
    except Exception as err:  # MisconfigurationException: e.g. accelerator=gpu on a machine without one
        if type(err).__name__ == "MisconfigurationException":
            hint = (
                "trainer=ddp_cpu for DDP over CPU processes"
                if "ddp" in str(args.get("strategy", ""))
                else "trainer=cpu (or trainer.accelerator=cpu)"
            )
            raise ConfigError(f"{err} Use {hint} on a machine without a GPU.") from err
        raise


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def resolve_input(cfg: DictConfig) -> tuple[str, Preprocess]:
    """The model's ``adapt`` mode and the preprocessing its weights expect, for the config's data.

    Args:
        cfg: a config with ``model`` and ``data`` groups (``data.image_size``: a request to the model).

    Returns:
        ``(adapt, preprocess)``: ``model.adapt=auto`` resolved from the input size, and what the data module
        and the classifier are built with.
    """
    data_class: type[ClassificationData] = get_class(cfg.data._target_)
    image_size, native_size = cfg.data.get("image_size"), data_class.native_size
    adapt = resolve_adapt(cfg.model.name, cfg.model.adapt, image_size, native_size)
    return adapt, model_preprocess(cfg.model.name, adapt, image_size, native_size)


def model_args(cfg: DictConfig, adapt: str) -> dict[str, Any]:
    """``create_model``'s arguments from the ``model`` group, ``adapt`` resolved.

    ``model.frozen_layers`` keeps pretrained layers as they are; a model trained from scratch has nothing there to
    keep (its low layers would stay random), so it trains them all, and the log says so.
    """
    args = {**_container(cfg.model), "adapt": adapt}
    if args.get("frozen_layers") and not (args.get("pretrained") or args.get("weights")):
        log.warning(
            "model.frozen_layers=%s keeps the lowest layers at their pretrained weights, and model.pretrained=false "
            "starts from random ones: every layer trains (pass model.frozen_layers=0 to say so)",
            args["frozen_layers"],
        )
        args["frozen_layers"] = 0
    return args


def build(cfg: DictConfig, cache_features: bool = True) -> tuple[ClassificationData | CachedFeatureData, Classifier]:
    """The data module and the LightningModule of a composed config, checked against each other.

    Data flows one way: the model's weights decide the preprocessing (``model.adapt=auto`` resolved from the
    input size on the way), the data module receives it in its constructor, and its class names size the
    head. A model that cannot take that size fails now, before any data is read.

    Args:
        cfg: the composed config.
        cache_features: honour ``finetune.cache_features`` (the lr range test trains on images only).

    Returns:
        ``(datamodule, module)``, both built with the same preprocessing. With ``finetune.cache_features`` the
        data module is wrapped in a :class:`~transfer.training.features.CachedFeatureData`, which serves the
        frozen epochs from the feature cache and passes everything else (``classes``, ``describe()``, ...) on.
    """
    adapt, preprocess = resolve_input(cfg)
    data = datamodule_from_config(cfg.data, preprocess)
    datamodule: ClassificationData | CachedFeatureData = data
    if cache_features and cfg.finetune.get("cache_features"):
        cache = FeatureCache(cfg.finetune.unfreeze_at_epoch, views=int(cfg.finetune.get("cache_views", 1)))
        datamodule = CachedFeatureData(data, cache)
    module = Classifier(
        model=model_args(cfg, adapt),
        class_names=data.classes,
        optimizer=_container(cfg.optimizer),
        scheduler=_container(cfg.scheduler),
        label_smoothing=float(cfg.label_smoothing),
        mix=_container(cfg.get("mix")),
        tta=bool(cfg.get("tta", False)),
        preprocess=preprocess.to_dict(),
    )
    check_input_size(module, preprocess.image_size)
    apply_compute(module.model, **_container(cfg.compute))
    return datamodule, module


def train(
    cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, started: float | None = None
) -> dict[str, Any]:
    """Train, test the best checkpoint, and write the run's outputs into ``run_dir``.

    Args:
        cfg: the composed config (``conf/config.yaml``).
        run_dir: where checkpoints, logs, figures and ``summary.json`` go; must not hold an earlier run.
        overrides: the command-line overrides that made ``cfg`` (recorded in the summary: sweep job
            directories are named by number only).
        started: ``time.time()`` when the run's clock started (the process start, which ``budget=`` counts
            from); ``None``: now.

    Returns:
        The summary written to ``summary.json``.
    """
    started = time.time() if started is None else started
    code_version()  # cached at the start: the summary names the code the run started with, not the tree at its end
    run_dir = Path(run_dir)
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    run_cfg = budgeted_config(cfg)  # budget=: an open-ended trainer and schedule, planned after a probe
    datamodule, module = build(run_cfg)
    _write_rank_zero(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    planner = budget_planner(run_cfg, started)
    history = History()
    validates = not OmegaConf.select(cfg, "data.train_on_val", default=False)
    checkpoint = best_and_last_checkpoint(run_dir, cfg.get("checkpoint"), planner is not None, validates)
    callbacks = [*build_callbacks(run_cfg, run_dir, history, checkpoint), *([planner] if planner else [])]
    trainer = build_trainer(run_cfg, run_dir, callbacks)

    start = time.perf_counter()
    # weights_only: a checkpoint cannot run code
    _, stopped = stoppable(trainer.fit, module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
    if stopped is not None:  # GracefulStop saved interrupted.ckpt (or said there was nothing to save)
        raise Stopped(stopped)
    train_seconds = time.perf_counter() - start
    best = checkpoint.best_model_path or None
    test, stopped = stoppable(trainer.test, module, datamodule=datamodule, ckpt_path=best, verbose=False)

    summary = _summary(cfg, module, datamodule, history, checkpoint, test or [], train_seconds)
    summary["tested"] = stopped is None  # a stop while testing still writes what training produced
    summary["distributed"] = _distributed(trainer, module)
    summary["overrides"] = list(overrides or [])
    summary["wall_s"] = round(time.time() - started, 2)  # from the process start (budget=) or train()'s call
    summary["budget"] = planner.summary(summary["wall_s"]) if planner else None
    with writing_outputs(run_dir):
        _write_outputs(cfg, trainer, history, summary, run_dir)
    if stopped is not None:
        announce_untested(stopped, run_dir, checkpoint.best_model_path)
        raise Stopped(stopped)
    return summary


# What a checkpoint that keeps the latest validation monitors: the global step, which only grows.
FINAL_MONITOR = "step"


def best_and_last_checkpoint(
    run_dir: Path, settings: Mapping[str, Any] | None = None, select_final: bool = False, validates: bool = True
) -> EpochCheckpoint:
    """``checkpoints/best-epochNN.ckpt`` by validation accuracy (``NN`` 1-based), and ``last.ckpt``: always the last
    finished epoch; ``settings`` is the config's ``checkpoint`` block (keep, keep_last, save_optimizer).

    With ``select_final`` (a budget) the checkpoint kept and tested is the latest validated one, the final step's:
    the schedule anneals there, and a budget's validations score a subset, so choosing by their score chose noise
    (CIFAR-10 ``budget=15m data.image_size=96`` tested epoch 2 of 3, mid-schedule, by 2 of 1024 images; see
    docs/recipe.md#budget). A run that ``validates`` nothing (``data.train_on_val``) selects the final step's too,
    saved at the end of each training epoch, as there is no validation to save after.
    """
    settings = settings or {}
    select_final = select_final or not validates
    return EpochCheckpoint(
        keep=int(settings.get("keep", 1)),
        keep_last=bool(settings.get("keep_last", True)),
        save_optimizer=bool(settings.get("save_optimizer", False)),
        dirpath=run_dir / "checkpoints",
        monitor=FINAL_MONITOR if select_final else "val/acc",
        mode="max",
        filename="best-epoch{epoch:02d}",
        auto_insert_metric_name=False,
        save_on_train_epoch_end=None if validates else True,
    )


def build_callbacks(cfg: DictConfig, run_dir: Path, history: History, checkpoint: ModelCheckpoint) -> list[L.Callback]:
    """Every callback of a run: staged unfreezing, the ``callbacks`` group, and the ones each run needs.

    Args:
        cfg: the composed config.
        run_dir: the run directory (``checkpoints/interrupted.ckpt`` on a signal).
        history: records the curves behind the figures and ``history.json``.
        checkpoint: best and last checkpoints.

    Returns:
        The callbacks, in the order Lightning calls them.
    """
    callbacks = [
        *finetune_callbacks(cfg),
        *_configured_callbacks(cfg),
        checkpoint,
        history,
        LearningRateMonitor("epoch"),
        TensorBoardExtras(),
        GracefulStop(run_dir / "checkpoints"),
        SlurmRequeue(),  # takes SLURM's requeue signal from Lightning, whose handler can deadlock in TensorBoard
        RunState(history),  # RNG streams, pending plateau step and history ride in the checkpoint
        FitSummary(),  # after the fine-tuning callback: counts what the first step trains
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        # By the clock, not every n steps: each refresh reads the logged loss with .item(), a device sync on a GPU.
        callbacks.append(TimedProgressBar(refresh_seconds=1.0))
    return callbacks


def _distributed(trainer: L.Trainer, module: Classifier) -> dict[str, Any]:
    in_sync = weights_in_sync(trainer, module)
    if in_sync is False:
        log.warning("the ranks finished with different weights: gradients were not averaged for some parameters")
    return {
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "weights_identical_across_ranks": in_sync,
    }


def _write_outputs(
    cfg: DictConfig, trainer: L.Trainer, history: History, summary: dict[str, Any], run_dir: Path
) -> None:
    """``summary.json``, ``history.json`` and the figures (rank zero), and the HParams entry of the loggers."""
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _figures(
            history,
            run_dir,
            f"{cfg.model.name} ({'pretrained' if cfg.model.pretrained else 'scratch'})",
            cfg.finetune.unfreeze_at_epoch,
            summary.get("best_epoch"),
            "final" if summary.get("selected_by") == "final" else "best",
        )
    log_hparams(trainer, _hparams(cfg), {k: summary[k] for k in ("test_acc", "best_val_acc", "images_per_second")})


def finetune_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Staged unfreezing from the ``finetune`` group (its ``cache_*`` keys go to the data module's cache).

    Args:
        cfg: the composed config.

    Returns:
        The callbacks.
    """
    args = {k: v for k, v in _container(cfg.finetune).items() if not k.startswith("cache_")}
    return [StagedFinetuning(**args)]


def _configured_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The ``callbacks`` group: every entry with a ``_target_`` (``~callbacks.<name>`` removes one)."""
    entries = cfg.get("callbacks") or {}
    return [instantiate(node) for node in entries.values() if node is not None and node.get("_target_")]


@rank_zero_only
def _write_rank_zero(path: Path, text: str) -> None:
    path.write_text(text)


def _summary(
    cfg: DictConfig,
    module: Classifier,
    datamodule: ClassificationData | CachedFeatureData,
    history: History,
    checkpoint: ModelCheckpoint,
    test: list[Mapping[str, float]],
    train_seconds: float,
) -> dict[str, Any]:
    val_acc, epoch = _selected(history, checkpoint)
    return {
        "model": cfg.model.name,
        "pretrained": bool(cfg.model.pretrained or cfg.model.weights),
        "adapt": module.model.meta.adapt,
        "weight_source": module.model.meta.weight_source,
        "params": count_parameters(module.model),
        "image_size": module.preprocess.image_size if module.preprocess else None,
        "epochs_run": len(history.epochs),
        "best_val_acc": val_acc,
        "best_epoch": epoch,
        "selected_by": "final" if checkpoint.monitor == FINAL_MONITOR else checkpoint.monitor,
        "test_acc": test[0].get("test/acc") if test else None,
        "test_loss": test[0].get("test/loss") if test else None,
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(history.images_per_second, 1),
        "best_checkpoint": checkpoint.best_model_path,
        "last_checkpoint": checkpoint.last_model_path,
        "seed": cfg.seed,
        # beside each split's size, the images the last validation and the test scored (limit_*_batches, DDP ranks)
        "data": datamodule.describe()
        | {"batch_size": datamodule.batch_size, "val_scored": history.val_scored, "test_scored": history.test_scored},
        # the strategy's device: by now Lightning's teardown has moved the module back to the CPU
        "device": str(module.trainer.strategy.root_device),
        "precision": str(module.trainer.precision),
        "channels_last": bool(cfg.compute.channels_last),
        "compiled": bool(cfg.compute.compile),
        "cached_frozen_phase": bool(OmegaConf.select(cfg, "finetune.cache_features")),
        "code": code_version(),
    }


def _selected(history: History, checkpoint: ModelCheckpoint) -> tuple[float | None, int | None]:
    """The tested checkpoint's validation accuracy and its epoch, numbered from 1 as ``history.json``, the figures
    and the log are: the best validation's, or with ``select_final`` the latest one's."""
    validated = [row for row in history.epochs if "val/acc" in row]
    if checkpoint.monitor == FINAL_MONITOR:
        if not validated:  # data.train_on_val: the final checkpoint is the last epoch's
            return None, (int(history.epochs[-1]["epoch"]) if history.epochs else None)
        return validated[-1]["val/acc"], int(validated[-1]["epoch"])
    row = max(validated, key=lambda r: r["val/acc"]) if validated else None  # the first of equal scores
    score = checkpoint.best_model_score  # a resumed run's best may come from before it: its score is kept
    val_acc = float(score) if score is not None else (row["val/acc"] if row else None)
    return val_acc, (int(row["epoch"]) if row else None)


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    """The settings a sweep varies, flat, for TensorBoard's HParams tab."""
    keys = (
        "model.name",
        "model.pretrained",
        "model.adapt",
        "model.frozen_layers",
        "optimizer._target_",
        "optimizer.lr",
        "optimizer.weight_decay",
        "scheduler._target_",
        "finetune.unfreeze_at_epoch",
        "finetune.backbone_lr_ratio",
        "finetune.bn",
        "finetune.cache_features",
        "data.batch_size",
        "data.augment_on",
        "data.image_size",
        "trainer.max_epochs",
        "trainer.precision",
        "seed",
        "label_smoothing",
    )
    values = {k: OmegaConf.select(cfg, k) for k in keys}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}


def _figures(
    history: History, run_dir: Path, title: str, unfreeze_epoch: int | None, best_epoch: int | None, kept: str
) -> None:
    history.save(run_dir / "history.json")
    if history.step_loss:
        plot_step_loss(history.step_loss, run_dir / "loss_per_iteration.png", f"Training loss per iteration: {title}")
    if history.epochs:
        plot_epoch_curves(history.epochs, run_dir / "curves_per_epoch.png", title, unfreeze_epoch, best_epoch, kept)
