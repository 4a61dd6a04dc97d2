"""Settings checked when the config is composed, before any data is read or any run directory is touched.

:func:`validate` turns every bad value it finds into one paragraph (:class:`~transfer.core.errors.ConfigError`).
:class:`Preflight` is the Hydra callback that runs it: in ``on_run_start``, which Hydra calls before it creates
the run directory and writes ``.hydra/`` into it, so a refused run leaves an earlier run's files untouched; and
in ``on_multirun_start`` for the sweep as a whole (each job checks its own settings again when it starts).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from transfer.core.errors import ConfigError, report_errors

_ABSENT = object()


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _share_or_count(v: Any) -> bool:
    """A fraction strictly between 0 and 1, or a whole count >= 1 (``1.5`` is neither)."""
    return _num(v) and (0 < v < 1 or (v >= 1 and float(v).is_integer()))


def _lightning_limit(v: Any) -> bool:
    """Lightning's ``limit_*_batches`` / ``val_check_interval``: a float fraction in [0, 1] or an integer count."""
    return (isinstance(v, float) and 0 <= v <= 1) or (_int(v) and v >= 0)


# (key, check, what it must be): keys absent from the composed config are skipped.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", _int, "an integer"),
    ("data.batch_size", lambda v: _int(v) and v >= 1, "a positive integer (images per training step, e.g. 64)"),
    ("data.eval_batch_size", lambda v: _int(v) and v >= 1, "a positive integer"),
    ("data.num_workers", _optional(lambda v: _int(v) and v >= 0), "null (one per core) or an integer >= 0"),
    ("data.image_size", _optional(lambda v: _int(v) and v >= 8), "null (the model decides) or an integer >= 8 (px)"),
    ("data.val_size", _share_or_count, "a fraction in (0, 1) or a whole image count >= 1"),
    ("data.test_size", _share_or_count, "a fraction in (0, 1) or a whole image count >= 1"),
    ("data.augment_on", lambda v: v in ("device", "cpu_pil"), "device or cpu_pil"),
    ("data.skip_corrupt", lambda v: isinstance(v, bool), "true or false"),
    ("data.train_on_val", lambda v: isinstance(v, bool), "true or false"),
    ("data.memory_limit_gb", lambda v: _num(v) and v >= 0, "a number of GB >= 0"),
    ("optimizer.lr", lambda v: _num(v) and v > 0, "a positive number (e.g. 1e-3)"),
    ("optimizer.weight_decay", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("optimizer.momentum", lambda v: _num(v) and 0 <= v < 1, "in [0, 1)"),
    ("scheduler.factor", lambda v: _num(v) and 0 < v < 1, "in (0, 1)"),
    ("scheduler.patience", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("scheduler.pct_start", lambda v: _num(v) and 0 <= v < 1, "in [0, 1)"),
    ("scheduler.warmup", lambda v: _num(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    ("finetune.unfreeze_at_epoch", _optional(lambda v: _int(v) and v >= 0), "null (never unfreeze) or an epoch >= 0"),
    ("finetune.backbone_lr_ratio", lambda v: _num(v) and v > 0, "a positive number (e.g. 0.1)"),
    ("finetune.layer_decay", lambda v: _num(v) and 0 < v <= 1, "in (0, 1]"),
    ("finetune.bn", lambda v: v in ("train", "frozen"), "train or frozen"),
    ("finetune.cache_views", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("trainer.max_epochs", lambda v: _int(v) and (v >= 1 or v == -1), "a positive integer (or -1: no limit)"),
    ("trainer.accumulate_grad_batches", lambda v: _int(v) and v >= 1, "a positive integer"),
    ("trainer.gradient_clip_val", _optional(lambda v: _num(v) and v > 0), "null or a positive number"),
    ("trainer.log_every_n_steps", lambda v: _int(v) and v >= 1, "a positive integer"),
    ("trainer.limit_train_batches", _lightning_limit, "a fraction in [0.0, 1.0] or a whole batch count"),
    ("trainer.limit_val_batches", _lightning_limit, "a fraction in [0.0, 1.0] or a whole batch count"),
    ("trainer.limit_test_batches", _lightning_limit, "a fraction in [0.0, 1.0] or a whole batch count"),
    ("trainer.val_check_interval", _optional(_lightning_limit), "null, a fraction of an epoch or a batch count"),
    *(
        (f"trainer.{flag}", _optional(lambda v: isinstance(v, bool)), "true, false or null")
        for flag in (
            "benchmark",
            "enable_progress_bar",
            "enable_checkpointing",
            "enable_model_summary",
            "sync_batchnorm",
            "inference_mode",
            "use_distributed_sampler",
            "detect_anomaly",
            "barebones",
        )
    ),
    ("trainer.deterministic", _optional(lambda v: isinstance(v, bool) or v == "warn"), "true, false, warn or null"),
    ("label_smoothing", lambda v: _num(v) and 0 <= v < 1, "in [0, 1)"),
    ("mix.mixup_alpha", lambda v: _num(v) and v >= 0, "a number >= 0 (0: off)"),
    ("mix.cutmix_alpha", lambda v: _num(v) and v >= 0, "a number >= 0 (0: off)"),
    ("mix.prob", lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    ("callbacks.divergence_guard.max_loss", _optional(lambda v: _num(v) and v > 0), "null or a positive number"),
    (
        "callbacks.mid_epoch_checkpoint.every_n_steps",
        _optional(lambda v: _int(v) and v >= 1),
        "null or a positive number of steps",
    ),
    (
        "callbacks.mid_epoch_checkpoint.every_n_minutes",
        _optional(lambda v: _num(v) and v > 0),
        "null or a positive number of minutes",
    ),
    ("checkpoint.keep", lambda v: _int(v) and v >= 0, "an integer >= 0 (best checkpoints kept; 0: none)"),
    ("checkpoint.keep_last", lambda v: isinstance(v, bool), "true or false"),
    ("checkpoint.save_optimizer", lambda v: isinstance(v, bool), "true or false"),
)


def _importable(target: Any) -> bool:
    """A ``_target_`` that names something importable, checked without importing it (no Lightning yet)."""
    if not isinstance(target, str) or "." not in target:
        return False
    module, name = target.rsplit(".", 1)
    if module == "transfer.data":
        import transfer.data

        return name in transfer.data.__all__
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _combination_problems(cfg: DictConfig) -> list[str]:
    """Settings that are each valid but cannot go together."""
    found = []
    target = OmegaConf.select(cfg, "data._target_", default=None)
    if target is not None and not _importable(target):
        found.append(
            f"data._target_={target!r} must name a data module class (data=cifar10 or data=imagefolder pick one)"
        )
    found += _validation_needed(cfg)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False) and accelerator == "cpu":
        found.append("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm runs on CUDA only)")
    return found


def _validation_needed(cfg: DictConfig) -> list[str]:
    """``data.train_on_val`` beside settings that read the validation split it trains on."""
    if OmegaConf.select(cfg, "data.train_on_val", default=False) is not True:
        return []
    monitor = str(OmegaConf.select(cfg, "scheduler.monitor", default=None) or "")
    readers = {
        f"scheduler.monitor={monitor} (scheduler=plateau steps on a validation metric)": monitor.startswith("val/"),
        "finetune.cache_features=true (it caches the validation features too)": bool(
            OmegaConf.select(cfg, "finetune.cache_features", default=False)
        ),
        "an Optuna search (hparams_search=..., whose objective is the best validation accuracy)": "optuna"
        in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")),
    }
    return [
        f"data.train_on_val=true trains on the validation images, so nothing is left to validate on, and "
        f"{reader} needs them: drop one of the two"
        for reader, reads in readers.items()
        if reads
    ]


def problems(cfg: DictConfig) -> list[str]:
    """Every rule :data:`RULES` (and ``resume``) breaks in ``cfg``, as ``key=value must be ...`` phrases."""
    found = _combination_problems(cfg)
    for key, check, what in RULES:
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except MissingMandatoryValue:
            found.append(f"{key} is required and not set (pass {key}=...)")
            continue
        except Exception as err:
            found.append(f"{key} cannot be resolved ({str(err).splitlines()[0]})")
            continue
        if value is not _ABSENT and not check(value):
            found.append(f"{key}={value!r} must be {what}")
    try:
        OmegaConf.select(cfg, "data.root", throw_on_missing=True)
    except MissingMandatoryValue:
        found.append("data.root is required for this data config (pass data.root=/path/to/your/images)")
    if OmegaConf.select(cfg, "budget", default=None) is not None:
        from transfer.training.budget_config import budget_problems  # imports torch: only for a run with a budget

        found += budget_problems(cfg)
    resume = OmegaConf.select(cfg, "resume", default=None)
    if resume:
        try:
            resume_path(resume)
        except ConfigError as err:
            found.append(str(err).rstrip("."))
    return found


def validate(cfg: DictConfig) -> None:
    """Raise one :class:`~transfer.core.errors.ConfigError` listing every bad setting in ``cfg`` (:func:`problems`)."""
    found = problems(cfg)
    if found:
        raise ConfigError(
            f"Invalid setting{'s' if len(found) > 1 else ''}: {'; '.join(found)}. Nothing was read or "
            f"written. Fix {'them' if len(found) > 1 else 'it'} on the command line or in conf/ "
            f"(python -m transfer.run --cfg job prints the composed config)."
        )


# What resume=<run dir> looks for in its checkpoints/ folder: the newest of these wins.
RESUMABLE = ("last.ckpt", "interrupted.ckpt", "mid-epoch.ckpt")


def resume_path(resume: str | Path) -> Path:
    """The checkpoint ``resume=`` names: a ``.ckpt`` file, or a run directory.

    In a run directory (or its ``checkpoints/`` folder) the newest of :data:`RESUMABLE` is taken:
    ``interrupted.ckpt`` (a stop) and ``mid-epoch.ckpt`` are later than ``last.ckpt`` (the last finished epoch)
    when the run was stopped inside an epoch.
    """
    path = Path(resume).expanduser()
    if path.is_dir():
        candidates = [folder / name for folder in (path / "checkpoints", path) for name in RESUMABLE]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ConfigError(
                f"resume={resume} is a directory without checkpoints/last.ckpt, interrupted.ckpt or mid-epoch.ckpt; "
                f"pass a run directory written by transfer.run or a .ckpt file"
            )
        # newest first; on equal times the order of RESUMABLE (an epoch boundary before a stop inside one)
        return max(found, key=lambda c: (c.stat().st_mtime_ns, -candidates.index(c)))
    if not path.is_file():
        raise ConfigError(
            f"resume={resume} does not exist; pass a run directory or a .ckpt file from its checkpoints/ folder"
        )
    return path


def check_checkpoint(
    path: Path, classes: list[str] | None = None, model: str | None = None, cfg: DictConfig | None = None
) -> list[str]:
    """Refuse a ``resume=`` file that is not a training checkpoint of this data, before anything runs.

    The file is read with ``weights_only=True`` (whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: it is
    passed explicitly), so a pickle that would run code is rejected, not executed.

    Args:
        path: the checkpoint.
        classes: the data's class names, to compare with the checkpoint's; ``None`` skips that check.
        model: the configured ``model.name``, likewise.
        cfg: the composed config, compared with the checkpoint's settings (:func:`resume_changes`); ``None``
            skips that.

    Returns:
        What :func:`resume_changes` found: one phrase per setting this run changes (each takes effect).
    """
    import pickle

    import torch

    remove_orphan_writes(path.parent)  # a kill mid-write left them beside the checkpoint resumed from
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise ConfigError(
            f"resume={path} cannot be read as a checkpoint with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:140] if str(err) else 'empty'}): it is not a .ckpt written by "
            f"transfer.run, it is damaged, or it holds pickled objects that could run code. Pass a run "
            f"directory or a file from its checkpoints/ folder."
        ) from err
    if isinstance(ckpt, dict) and "selection" in ckpt and "loops" not in ckpt:  # see EpochCheckpoint
        raise ConfigError(
            f"resume={path} is a best checkpoint holding the weights only (no optimizer or loop state, as "
            f"checkpoint.save_optimizer=false writes it), so training cannot continue from it. Pass "
            f"resume={path.parent / 'last.ckpt'} (or the run directory) instead."
        )
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
        raise ConfigError(
            f"resume={path} is not a Lightning training checkpoint (no state_dict/loops entry; a "
            f"weights file goes to model.weights=, not resume=). Pass a file from a run's checkpoints/."
        )
    trained = ((ckpt.get("hyper_parameters") or {}).get("model") or {}).get("name")
    if model is not None and trained is not None and trained != model:
        raise ConfigError(
            f"resume={path} was trained with model={trained} but this run builds model={model}. "
            f"Pass model={trained} (and the rest of that run's settings) to resume it."
        )
    saved = (ckpt.get("transfer") or {}).get("class_names")
    if classes is not None and saved is not None and list(saved) != list(classes):
        raise ConfigError(
            f"resume={path} was trained on {len(saved)} classes ({', '.join(saved[:6])}"
            f"{', ...' if len(saved) > 6 else ''}) but the data has {len(classes)} ({', '.join(classes[:6])}"
            f"{', ...' if len(classes) > 6 else ''}). Resume with the data.root (and data=...) of that run, or "
            f"start a new run with model.weights= to fine-tune from it."
        )
    return resume_changes(path, ckpt, cfg) if cfg is not None else []


def _class_of(node: Any) -> str | None:
    return node.get("_target_") if isinstance(node, dict) else None


def _saved_state(ckpt: dict, callback: str) -> dict:
    """A callback's state in ``ckpt`` (Lightning keys it by the class name, with arguments in braces)."""
    states = ckpt.get("callbacks") or {}
    return next((v for k, v in states.items() if str(k).split("{")[0] == callback and isinstance(v, dict)), {})


def resume_changes(path: Path, ckpt: dict, cfg: DictConfig) -> list[str]:
    """The settings a resumed run changes from its checkpoint's: each one either takes effect or is refused.

    Refused (:class:`~transfer.core.errors.ConfigError`): another optimizer or scheduler class (their saved state
    belongs to the class), another ``data.train_on_val`` (which images validate) and another
    ``finetune.unfreeze_at_epoch`` (the param groups' schedule is in the
    optimizer state). Taking effect (returned, one phrase each): the optimizer's settings (``lr``, weight decay,
    ...), the scheduler's arguments and ``trainer.max_epochs``; the run re-plans its lr schedule from the step it
    resumes at (:func:`transfer.training.optim.replan`). Callbacks are always this run's.
    """
    saved = ckpt.get("hyper_parameters") or {}
    now: dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
        for key in ("optimizer", "scheduler")
    }
    for key in ("optimizer", "scheduler"):
        if key in saved and _class_of(saved[key]) != _class_of(now[key]):
            raise ConfigError(
                f"resume={path} was trained with {key}._target_={_class_of(saved[key])} but this run sets "
                f"{key}._target_={_class_of(now[key])}: the checkpoint's {key} state belongs to its class and "
                f"cannot continue in another. Pass the {key} of that run to resume it, or start a new run with "
                f"model.weights={path} to fine-tune from its weights with the new {key}."
            )
    from transfer.core.checkpoint_meta import trained_on_val  # imports torch, as the loaded checkpoint did

    trained = trained_on_val(ckpt)
    if trained != bool(OmegaConf.select(cfg, "data.train_on_val", default=False)):
        was = str(trained).lower()
        then = "validate on images it trained on" if trained else "train on the images it validated on"
        raise ConfigError(
            f"resume={path} was trained with data.train_on_val={was} but this run sets the other value: it would "
            f"{then}. Pass data.train_on_val={was} to resume it, or start a new run with model.weights={path}."
        )
    unfreeze = _saved_state(ckpt, "StagedFinetuning").get("unfreeze_at_epoch", _ABSENT)
    configured = OmegaConf.select(cfg, "finetune.unfreeze_at_epoch", default=_ABSENT)
    if unfreeze is not _ABSENT and configured is not _ABSENT and unfreeze != configured:
        raise ConfigError(
            f"resume={path} was trained with finetune.unfreeze_at_epoch={unfreeze} but this run sets "
            f"{configured}: when each param group trains is part of the checkpoint's optimizer state. Pass "
            f"finetune.unfreeze_at_epoch={unfreeze} to resume it, or start a new run with model.weights={path}."
        )
    changes = []
    for key in ("optimizer", "scheduler"):
        old, new = saved.get(key) or {}, now[key] or {}
        changes += [
            f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
    epochs = _saved_state(ckpt, "RunState").get("max_epochs")
    if epochs is not None and epochs != OmegaConf.select(cfg, "trainer.max_epochs"):
        changes.append(f"trainer.max_epochs: {epochs} -> {OmegaConf.select(cfg, 'trainer.max_epochs')}")
    return changes


def check_launcher(cfg: DictConfig) -> None:
    """A SLURM launcher needs ``sbatch``: say so in one paragraph instead of submitit's traceback."""
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if "submitit" in target and "Slurm" in target and shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=slurm submits every job with sbatch, which is not on this machine's PATH (not a SLURM "
            "login node?). Run the sweep on the cluster, or drop hydra/launcher=slurm to run the jobs here one "
            "after another."
        )


def check_fresh(run_dir: Path) -> None:
    """Refuse to write into a directory that already holds a run's results, so nothing is overwritten.

    Temporary files a killed checkpoint write left in ``checkpoints/`` are removed first
    (:func:`remove_orphan_writes`): they are no results.
    """
    ckpts = run_dir / "checkpoints"
    remove_orphan_writes(ckpts)
    if (run_dir / "summary.json").exists() or (ckpts.is_dir() and any(ckpts.iterdir())):
        raise ConfigError(
            f"The run directory {run_dir} already holds a finished or running job's checkpoints/summary; refusing "
            f"to overwrite them. Start the run again (the default directory name carries the time), or pass "
            f"hydra.run.dir=<a new folder>. To continue that run, pass resume={ckpts / 'last.ckpt'} with a new "
            f"directory."
        )


def remove_orphan_writes(folder: Path) -> None:
    """Remove what killed checkpoint writes left in ``folder`` (Lightning is imported only when there is some)."""
    if folder.is_dir() and any(folder.glob(".*.tmp")):
        from transfer.training.checkpoint_io import remove_orphans

        remove_orphans(folder)


def check_writable(folder: Path, setting: str = "hydra.run.dir") -> None:
    """Refuse a run directory that cannot be made or written: a path through a file, or a read-only folder.

    Checked before Hydra creates the directory, so the refusal is one paragraph and nothing is written. A disk
    that fills up later is reported where the write fails (:mod:`transfer.core.disk`).

    Args:
        folder: the directory the run will write into (it may not exist yet).
        setting: the setting that chose it, for the message.
    """
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{setting}={folder} runs through {existing}, which is a file, not a folder: the run directory cannot "
            f"be made there. Choose another {setting}=, or move that file away."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{setting}={folder} cannot be written: {existing} is read-only for this user. Choose another "
            f"{setting}= on a writable disk, or make {existing} writable."
        )


# The run directory of this process's single run, and the topmost of its folders that did not exist before it: what
# remove_refused_run may take away. Set by Preflight.on_run_start, before Hydra creates the directory.
_NEW_RUN_DIR: dict[str, Path] = {}
# What Hydra writes into a run directory before the task starts: its output subdir and files, and the job log.
_HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})


def note_new_run_dir(run_dir: Path) -> None:
    """Remember ``run_dir`` and the topmost of its folders that does not exist yet (none: nothing to remember)."""
    _NEW_RUN_DIR.clear()
    run_dir = run_dir.absolute()
    if run_dir.exists():
        return
    top = run_dir
    while not top.parent.exists():
        top = top.parent
    _NEW_RUN_DIR.update(run=run_dir, top=top)


def remove_refused_run(run_dir: Path, output_subdir: str | None, job_log: str) -> bool:
    """Remove the directory of a run refused before it trained, if it holds exactly what Hydra wrote into it.

    Only a directory :func:`note_new_run_dir` saw created by this run qualifies, and only while it holds nothing
    but Hydra's ``output_subdir`` (``.hydra/`` with its config, hydra and overrides files) and the job log; the
    folders above it that the run created go too when that leaves them empty.

    Args:
        run_dir: the run directory.
        output_subdir: Hydra's ``hydra.output_subdir`` (``.hydra``), or ``None`` when it writes none.
        job_log: the file name of the job log (``<job name>.log``).

    Returns:
        Whether the directory was removed.
    """
    run_dir = run_dir.absolute()
    if _NEW_RUN_DIR.get("run") != run_dir or os.environ.get("LOCAL_RANK", "0") != "0" or not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        if entry.name == job_log and entry.is_file() and not entry.is_symlink():
            continue
        hydra_dir = entry.name == output_subdir and entry.is_dir() and not entry.is_symlink()
        inside = list(entry.iterdir()) if hydra_dir else []
        if not inside or any(f.name not in _HYDRA_FILES or not f.is_file() or f.is_symlink() for f in inside):
            return False
    shutil.rmtree(run_dir)
    folder, top = run_dir.parent, _NEW_RUN_DIR["top"]
    while top != run_dir and (folder == top or top in folder.parents):
        try:
            folder.rmdir()  # only while empty: another run may have started in it meanwhile
        except OSError:
            break
        folder = folder.parent
    _NEW_RUN_DIR.clear()
    return True


class Preflight(Callback):
    """Hydra callback: :func:`validate`, the run directory's freshness and the run's inputs
    (:func:`transfer.training.inputs.check_inputs`) before Hydra writes anything."""

    @report_errors
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        validate(config)
        run_dir = Path(str(config.hydra.run.dir))
        if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP ranks > 0 share rank 0's directory
            check_writable(run_dir)
            check_fresh(run_dir)
            note_new_run_dir(run_dir)
        from transfer.training.inputs import check_inputs  # imports torch and the models: only for a valid config

        check_inputs(config)

    @report_errors
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_launcher(config)
        validate(config)
        check_writable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")
