"""Command line: ``python -m transfer.run model=resnet18 trainer.devices=1`` (Hydra; ``-m`` for sweeps).

A thin wrapper: Hydra composes ``conf/`` (installed as the package ``transfer.conf``), and
:func:`transfer.training.train.train` does the work in Hydra's run directory. Lightning and the data and model
code are imported inside the functions, so ``--help``, ``--cfg job`` and a refused setting answer in about a
second instead of after ~10 s of imports.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from transfer.conf import CONF_DIR, CONF_PATH
from transfer.core.command_line import checked_command_line, config_groups
from transfer.core.errors import report_errors
from transfer.core.exit_status import graceful_exit
from transfer.experiments.sweep import sweep_job
from transfer.training.inputs import check_inputs
from transfer.training.preflight import check_checkpoint, resume_path, validate

log = logging.getLogger(__name__)
# --help lists the groups a run takes (conf/hydra/help/transfer.yaml), not the tools' configs beside them
OmegaConf.register_new_resolver("transfer_config_groups", lambda: config_groups(CONF_DIR), replace=True)


def prepare(cfg: DictConfig) -> None:
    """Check the settings (again: a sweep job's own overrides were not seen by the preflight callback) and turn
    ``resume=<run dir>`` into the checkpoint it means (the newest of ``checkpoints/last.ckpt``, ``interrupted.ckpt``
    and ``mid-epoch.ckpt``), compared with this run's settings before anything is built."""
    validate(cfg)
    check_inputs(cfg)  # the data root's layout and the weights, before Lightning, the model or the data are built
    if cfg.get("resume"):
        from transfer.data import datamodule_from_config

        asked = Path(str(cfg.resume))
        cfg.resume = str(resume_path(cfg.resume))
        classes = datamodule_from_config(cfg.data, preprocess=None).classes  # only the class folders are read
        changes = check_checkpoint(Path(cfg.resume), classes, cfg.model.name, cfg)
        if asked.is_dir():
            log.info("resume=%s: the newest checkpoint there is %s", asked, cfg.resume)
        log.info(
            "resume=%s: from the checkpoint: the weights, the optimizer state, the lr schedule's position, the epoch "
            "and step, the RNG streams and the data loader's position; from this run: every other setting%s",
            cfg.resume,
            f" (changed: {'; '.join(changes)}; the lr schedule is re-planned from the step it resumes at)"
            if changes
            else " (the optimizer, scheduler and trainer.max_epochs are the checkpoint's)",
        )


_jobs_started: list[float] = []


def process_start() -> float | None:
    """``time.time()`` when this process started (Linux ``/proc``), or ``None`` where that cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def job_started() -> float:
    """When this job's clock starts, which ``budget=`` counts from: the process's own start for the first job of a
    ``python -m transfer.run`` process (interpreter start, imports and composition are spent budget too), and the
    call itself for a later job of a sweep, or a call from Python."""
    now = time.time()
    first = not _jobs_started
    _jobs_started.append(now)
    started = process_start() if first and __name__ == "__main__" else None
    return now if started is None else min(started, now)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def budget_line(summary: dict, wall_s: float) -> str | None:
    """The last console line of a ``budget=`` run: the budget against the wall time it took."""
    budget = (summary.get("budget") or {}).get("budget_s")
    if not budget:
        return None
    return f"budget {budget:.0f} s, actual {wall_s:.1f} s ({(wall_s / budget - 1) * 100:+.1f}%)"


def describe(summary: dict) -> str:
    """The one-line result a run ends with: accuracies in % (two decimals), the epoch numbered from 1 as in the
    log and ``history.json``, seconds to a tenth."""
    data = summary.get("data") or {}
    # a photo set without a test/ folder is tested on images held out of train/: say so, and how many
    held_out = str(data.get("test_from", "")).startswith("held out")
    tested_on = f" on {data.get('test_scored')} images {data['test_from']}" if held_out else ""
    which = "final" if summary.get("selected_by") == "final" else "best"  # a budget tests its last step's weights
    scored = (
        "its validation images trained too"
        if data.get("train_on_val")
        else f"val accuracy {_percent(summary['best_val_acc'])}"
    )
    return (
        f"{summary['model']}: test accuracy {_percent(summary['test_acc'])}{tested_on} ({which} checkpoint: epoch "
        f"{summary['best_epoch']}, {scored}); "
        f"trained {summary['train_seconds']:.1f} s at {_rate(summary['images_per_second'])} images/s"
    )


def _rate(per_second: float) -> str:
    return f"{per_second:.1f}" if per_second < 10 else f"{per_second:.0f}"  # a slow CPU run is not "0 images/s"


@checked_command_line("transfer.run", CONF_PATH, "config")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="config")
@report_errors  # a TransferError: one paragraph, exit status 2
@graceful_exit  # stopped by SIGINT/SIGTERM: exit status 130/143 after saving checkpoints/interrupted.ckpt
@sweep_job  # in -m: a failing job writes failed.json and the sweep goes on
def main(cfg: DictConfig) -> float | None:
    """Train one configuration; returns the best validation accuracy (what Hydra sweepers optimise: model
    selection never looks at the test set)."""
    started = job_started()
    from lightning.pytorch.utilities import rank_zero_only

    from transfer.training.train import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    prepare(cfg)
    summary = train(cfg, run_dir, overrides=list(HydraConfig.get().overrides.task), started=started)
    if getattr(rank_zero_only, "rank", 0) == 0:  # under DDP every rank runs this function; Lightning sets .rank
        print(f"\n{describe(summary)}; outputs in {run_dir}")
        budget = budget_line(summary, time.time() - started)
        if budget:
            print(budget)
    return summary["best_val_acc"]


if __name__ == "__main__":
    main()
