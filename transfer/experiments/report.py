"""One report for a sweep: ``python -m transfer.report sweep=<sweep dir>``, also written after every ``-m`` run.

Reads each job's ``summary.json`` and ``history.json`` and writes ``report.md``, ``report.csv`` (a row per
job) and ``val_acc.png`` / ``val_loss.png`` (every job's validation curve on one plot). Jobs that differ only
in ``seed`` are also summarised as mean ± std. Jobs that failed (``failed.json``, see
:mod:`transfer.experiments.sweep`) or left no result (killed) are listed with their reason, and a sweep with any
of them exits non-zero.

Job directories are named by their number alone (``hydra.sweep.subdir`` in ``conf/config.yaml``), so one can be
passed to ``ckpt=`` as it is; what a job ran with is its overrides, which Hydra records in the job's
``.hydra/overrides.yaml``. The report labels each job with the overrides that tell it apart from the sweep's
other jobs (the ``overrides`` column and the figures' legend) and lists the ones every job shares once.

Epochs are numbered from 1, as in ``history.json`` and ``summary.json``. ``report.md`` is for reading
(accuracies in %, seconds to a tenth); ``report.csv`` keeps the summaries' machine-readable values (accuracies as
fractions, full precision).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transfer.core.errors import ConfigError
from transfer.core.escape import csv_record, markdown, markdown_code
from transfer.experiments.sweep import FAILED

COLUMNS = (
    "job",
    "overrides",
    "model",
    "pretrained",
    "adapt",
    "seed",
    "params",
    "epochs_run",
    "best_val_acc",
    "best_epoch",
    "test_acc",
    "epoch_to_90pct",
    "train_seconds",
    "images_per_second",
)


def epoch_to_fraction(
    val_accs: Sequence[float], fraction: float = 0.9, epochs: Sequence[int] | None = None
) -> int | None:
    """First epoch whose validation accuracy reached ``fraction`` of the run's best: how fast it learns.

    Args:
        val_accs: the validation accuracies, in epoch order.
        fraction: of the best accuracy.
        epochs: the epoch (from 1) of each accuracy, as ``history.json`` numbers them; ``None``: 1, 2, 3, ...
    """
    if not val_accs:
        return None
    target = fraction * max(val_accs)
    numbers = list(epochs) if epochs is not None else list(range(1, len(val_accs) + 1))
    return next(n for n, acc in zip(numbers, val_accs, strict=True) if acc >= target)


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job ``2`` before job ``10`` (names are job numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def job_overrides(job: Path) -> list[str]:
    """The command-line overrides a job ran with: Hydra's ``.hydra/overrides.yaml``, else ``failed.json``'s."""
    recorded = job / ".hydra" / "overrides.yaml"
    if recorded.is_file():
        return [str(o) for o in OmegaConf.load(recorded)]
    failed = job / FAILED
    return [str(o) for o in json.loads(failed.read_text()).get("overrides", [])] if failed.is_file() else []


def label_overrides(jobs: list[dict[str, Any]]) -> list[str]:
    """Set each job's ``overrides`` to the ones that tell it apart; returns the ones every job shares.

    Args:
        jobs: rows (finished and failed) with ``all_overrides``, the job's full list; changed in place.
    """
    shared = set.intersection(*(set(j["all_overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    for j in jobs:
        j["overrides"] = " ".join(o for o in j["all_overrides"] if o not in shared)
    return [o for o in jobs[0]["all_overrides"] if o in shared] if jobs else []


def collect(sweep: Path) -> list[dict[str, Any]]:
    """A row per finished job under ``sweep`` (any depth), with its overrides and validation curves."""
    rows = []
    for summary_path in sorted(sweep.rglob("summary.json"), key=_natural):
        summary = json.loads(summary_path.read_text())
        history_path = summary_path.parent / "history.json"
        epochs = json.loads(history_path.read_text())["epochs"] if history_path.exists() else []
        curves = {
            key: ([int(e["epoch"]) for e in epochs if key in e], [e[key] for e in epochs if key in e])
            for key in ("val/acc", "val/loss")
        }
        row = {c: summary.get(c) for c in COLUMNS}
        row.update(
            job=summary_path.parent.name,
            all_overrides=job_overrides(summary_path.parent),
            epoch_to_90pct=epoch_to_fraction(curves["val/acc"][1], epochs=curves["val/acc"][0]),
            curves=curves,
        )
        rows.append(row)
    return rows


def collect_failed(sweep: Path) -> list[dict[str, Any]]:
    """``{job, all_overrides, reason}`` per job under ``sweep`` that failed (``failed.json``) or left no result."""
    failed = []
    for record_path in sorted(sweep.rglob(FAILED), key=_natural):
        record = json.loads(record_path.read_text())
        failed.append(
            {
                "job": record_path.parent.name,
                "all_overrides": job_overrides(record_path.parent),
                "reason": record.get("reason", "failed"),
            }
        )
    for overrides in sorted(sweep.rglob(".hydra/overrides.yaml"), key=_natural):
        job = overrides.parent.parent
        if not (job / "summary.json").exists() and not (job / FAILED).exists():
            failed.append(
                {
                    "job": job.name,
                    "all_overrides": job_overrides(job),
                    "reason": "no summary.json or failed.json: still running, or killed (out of memory, "
                    "SIGKILL); see the job's log",
                }
            )
    return failed


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of test/val accuracy over jobs with the same model, pretrained and adapt but different seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["pretrained"], r["adapt"])].append(r)
    out = []
    for (model, pretrained, adapt), members in groups.items():
        if len({m["seed"] for m in members}) < 2:
            continue
        stats = {"model": model, "pretrained": pretrained, "adapt": adapt, "seeds": len(members)}
        for key in ("test_acc", "best_val_acc"):
            values = [m[key] for m in members if m[key] is not None]
            stats[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(stats)
    return out


ACCURACIES = ("best_val_acc", "test_acc")


def percent(fraction: float) -> str:
    """An accuracy as people read it: ``0.3456`` is ``34.56%``."""
    return f"{100 * fraction:.2f}%"


def _fmt(value: Any, column: str = "") -> str:
    """A Markdown cell's text: accuracies in %, seconds to a tenth, throughput in whole images."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if column in ACCURACIES:
            return percent(value)
        if column == "train_seconds":
            return f"{value:.1f} s"
        if column == "images_per_second":
            return f"{value:.0f}"
        if isinstance(value, float):
            return f"{value:.4g}"
    return str(value)


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A legend entry: the job and the overrides that tell it apart; without those (a lone job, or directories
    Hydra did not write), model, weights and adapt (and seed when the jobs vary it)."""
    if row["overrides"]:
        return f"{row['job']}: {row['overrides']}"
    label = f"{row['job']} {row['model']} {'pretrained' if row['pretrained'] else 'scratch'} {row['adapt']}"
    return label + (f" seed {row['seed']}" if len({r["seed"] for r in rows}) > 1 else "")


def _cell(value: Any, column: str = "") -> str:
    return markdown(_fmt(value, column))  # overrides, reasons and names are text from the command line and from files


def _spread(mean: float, std: float) -> str:
    """Mean ± standard deviation of accuracies, in % (the deviation in percentage points)."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}%"


def markdown_lines(
    sweep: Path, rows: list[dict[str, Any]], failed: list[dict[str, Any]], shared: list[str]
) -> list[str]:
    """The report's Markdown, without the figures: the job table, the shared overrides, seed statistics, failures."""
    lines = [f"# Sweep report: {markdown(sweep)}", ""]
    if shared:
        lines += ["Overrides shared by every job: " + markdown_code(" ".join(shared)), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c], c) for c in COLUMNS) + " |" for r in rows]
    groups = seed_groups(rows)
    if groups:
        lines += [
            "",
            "## Over seeds (mean ± std)",
            "",
            "| model | pretrained | adapt | seeds | test acc | best val acc |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(g['model'])} | {g['pretrained']} | {_cell(g['adapt'])} | {g['seeds']} | "
            f"{_spread(*g['test_acc'])} | {_spread(*g['best_val_acc'])} |"
            for g in groups
        ]
    if failed:
        lines += [
            "",
            f"## Failed jobs ({len(failed)} of {len(rows) + len(failed)})",
            "",
            "| job | overrides | reason |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {_cell(f['job'])} | {_cell(f['overrides'])} | {_cell(f['reason'])} |" for f in failed]
    return lines


def write_report(sweep: Path) -> Path:
    """Write ``report.md``, ``report.csv`` and the overlay PNGs into ``sweep``; returns the Markdown path."""
    from transfer.core.plots import overlay_curves

    rows, failed = collect(sweep), collect_failed(sweep)
    if not rows and not failed:
        raise ConfigError(f"No finished jobs (summary.json files) under {sweep}; pass a sweep or run directory.")
    shared = label_overrides(rows + failed)
    with open(sweep / "report.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=(*COLUMNS, "status", "reason"), extrasaction="ignore")
        writer.writeheader()
        records = [{**r, "status": "ok"} for r in rows] + [{**f, "status": "failed"} for f in failed]
        writer.writerows([csv_record(r) for r in records])
    lines = markdown_lines(sweep, rows, failed, shared)
    for key, name in (("val/acc", "val_acc.png"), ("val/loss", "val_loss.png")) if rows else ():
        overlay_curves(
            {_label(r, rows): r["curves"][key] for r in rows},
            key.replace("val/", "validation "),
            sweep / name,
            best={_label(r, rows): r["best_epoch"] for r in rows},
        )
        lines += ["", f"![{key}]({name})"]
    (sweep / "report.md").write_text("\n".join(lines) + "\n")
    return sweep / "report.md"


class SweepReport(Callback):
    """Hydra callback: writes the report into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the report; exit with status 1 when any job failed (after the report, so it is never lost)."""
        sweep = Path(config.hydra.sweep.dir)
        if any(sweep.rglob("summary.json")) or any(sweep.rglob(FAILED)):
            print(f"sweep report: {write_report(sweep)}")
        failed = collect_failed(sweep) if sweep.is_dir() else []
        if failed:
            print(
                f"{len(failed)} job(s) of the sweep failed: "
                + "; ".join(f"{f['job']}: {f['reason'][:160]}" for f in failed),
                file=sys.stderr,
            )
            sys.exit(1)
