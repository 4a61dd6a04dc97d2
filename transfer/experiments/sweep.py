"""Sweeps survive their jobs: in ``-m`` a failing job is recorded and the sweep goes on.

Hydra's basic launcher runs the jobs one after another; an exception escaping one job would end the sweep
after it (and a ``sys.exit`` at once), so the other jobs never run and no report is written. :func:`sweep_job`
catches the failure instead, writes ``failed.json`` (the one-line reason, the job's overrides) into the job's
directory and its traceback into ``traceback.txt`` beside it, and returns ``None``. The sweep report lists
the job as failed and the sweep then exits non-zero (:class:`transfer.experiments.report.SweepReport`). A single run
records its failure the same way, then fails as before; but a single run refused (a
:class:`~transfer.core.errors.TransferError`) before it trained, whose directory holds nothing but what Hydra wrote,
leaves no directory at all (:func:`transfer.training.preflight.remove_refused_run`).

With ``checkpoint.keep=0`` a sweep keeps one best checkpoint in all: the best job's (by ``best_val_acc``, the
earlier job on a tie), so that the sweep's winner can still be evaluated, exported or served
(:func:`keep_sweep_best`, after each job).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transfer.core.disk import write_fault
from transfer.core.errors import TransferError
from transfer.training.preflight import remove_refused_run

F = TypeVar("F", bound=Callable[..., Any])
FAILED = "failed.json"


def one_line(err: BaseException, limit: int = 400) -> str:
    """A failure as one line: the message of a :class:`TransferError`, else ``Type: first line``."""
    text = " ".join(str(err).split())
    if not isinstance(err, TransferError):
        text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record_failure(job_dir: Path, err: BaseException) -> dict[str, Any]:
    """Write ``failed.json`` for a job that raised ``err``; returns what was written."""
    hydra = HydraConfig.get()
    record = {
        "status": "failed",
        "reason": one_line(err),
        "error": type(err).__name__,
        "job": job_dir.name,
        "job_num": OmegaConf.select(cast(DictConfig, hydra), "job.num", default=None),  # a DictConfig at run time
        "overrides": list(hydra.overrides.task),
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    # through a rename: on a full disk a half-written failed.json would break the sweep report; none is better
    tmp = job_dir / f".{FAILED}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, job_dir / FAILED)
    finally:
        tmp.unlink(missing_ok=True)
    return record


def sweep_job(fn: F) -> F:
    """Record a failure in ``failed.json``; in a multirun, then return ``None`` so the other jobs run.

    A single run records its failure too (so ``transfer.report`` can say why) and re-raises it.
    ``KeyboardInterrupt`` and ``SystemExit`` (Ctrl-C, SIGTERM) are not recorded and still stop a whole sweep.
    """

    @wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        except ValueError:
            multirun = False
        try:
            result = fn(cfg, *args, **kwargs)
        except Exception as raised:
            # a full disk, a read-only folder: one paragraph naming the path (exit status 2), and failed.json's reason
            fault = write_fault(raised, Path.cwd())
            err: Exception = fault if fault is not None else raised
            job_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
            if job_dir is None:
                _reraise(err, raised)
            if not multirun and isinstance(err, TransferError) and _remove_if_untouched(job_dir):
                _reraise(err, raised)  # refused before training: nothing of the run is left to record a failure in
            record = {"job": job_dir.name, "reason": one_line(err)}
            if not (job_dir / "summary.json").exists():  # never touch a finished run's files
                try:
                    record = record_failure(job_dir, err)
                    (job_dir / "traceback.txt").write_text(traceback.format_exc())
                except OSError:  # a full or read-only disk must not hide the job's own error
                    pass
            if not multirun:  # a single run: the caller prints the error and sets the exit status
                _reraise(err, raised)
            print(f"\njob {record['job']} failed: {record['reason']}", file=sys.stderr, flush=True)
            return None
        if multirun and OmegaConf.select(cfg, "checkpoint.keep", default=None) == 0 and _rank_zero():
            keep_sweep_best(Path(HydraConfig.get().runtime.output_dir).parent)
        return result

    return wrapper  # type: ignore[return-value]


def _reraise(err: Exception, raised: Exception) -> NoReturn:
    """Raise what a job ends with: ``err``, chained to the exception it stands for when it replaced one."""
    if err is raised:
        raise raised
    raise err from raised


def _remove_if_untouched(job_dir: Path) -> bool:
    hydra = HydraConfig.get()
    return remove_refused_run(job_dir, hydra.output_subdir, f"{hydra.job.name}.log")


def _rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"


def keep_sweep_best(sweep_dir: Path) -> Path | None:
    """``checkpoint.keep=0`` in a sweep: remove every finished job's best checkpoints but the best job's.

    Jobs are compared by their ``summary.json``'s ``best_val_acc`` (the earlier job wins a tie; a job without a
    score never wins); the removed files' ``best_checkpoint`` in their job's summary becomes ``null``. Jobs still
    running are not touched: each job calls this when it ends.

    Args:
        sweep_dir: the sweep directory (its job directories hold ``summary.json`` and ``checkpoints/``).

    Returns:
        The job directory whose best checkpoint stays, or ``None`` when no finished job has a score (none has
        finished, or they trained on their validation images): then nothing is removed.
    """
    finished = []
    for summary in sweep_dir.glob("*/summary.json"):
        try:
            record = json.loads(summary.read_text())
        except (OSError, ValueError):
            continue
        score = record.get("best_val_acc")
        job = summary.parent
        num = int(job.name) if job.name.isdigit() else 1 << 30
        finished.append(((isinstance(score, (int, float)), score if isinstance(score, (int, float)) else 0, -num), job))
    if not any(scored for (scored, _, _), _ in finished):
        return None  # nothing to compare by (data.train_on_val validates nothing): every job keeps its own
    winner = max(finished, key=lambda item: item[0])[1]
    for _, job in finished:
        best = sorted((job / "checkpoints").glob("best*.ckpt"))
        if job == winner or not best:
            continue
        for path in best:
            path.unlink(missing_ok=True)
        _forget_best(job / "summary.json")
    return winner


def _forget_best(summary: Path) -> None:
    """Set ``best_checkpoint`` to ``null`` in ``summary`` (written whole, through a rename)."""
    record = json.loads(summary.read_text())
    record["best_checkpoint"] = None
    tmp = summary.with_name(f".{summary.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, summary)
