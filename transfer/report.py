"""One report for a sweep: ``python -m transfer.report <sweep dir>``, also written by Hydra after every ``-m`` run.

Reads each job's ``summary.json`` and ``history.json`` and writes ``report.md``, ``report.csv`` (a row per
job) and ``val_acc.png`` / ``val_loss.png`` (every job's validation curve on one plot). Jobs that differ only
in ``seed`` are also summarised as mean ± std. Jobs that failed (``failed.json``, see :mod:`transfer.sweep`) or
left no result (killed) are listed with their reason, and a sweep with any of them exits non-zero.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from transfer.errors import ConfigError, report_errors
from transfer.sweep import FAILED

COLUMNS = ("job", "model", "pretrained", "adapt", "seed", "params", "epochs_run", "best_val_acc", "test_acc",
           "epoch_to_90pct", "train_seconds", "images_per_second")


def epoch_to_fraction(val_accs: list[float], fraction: float = 0.9) -> int | None:
    """First epoch (1-based) whose validation accuracy reached ``fraction`` of the run's best: how fast it learns."""
    if not val_accs:
        return None
    target = fraction * max(val_accs)
    return next(i + 1 for i, acc in enumerate(val_accs) if acc >= target)


def collect(sweep: Path) -> list[dict[str, Any]]:
    """A row per finished job under ``sweep`` (any depth), with its validation curves."""
    rows = []
    for summary_path in sorted(sweep.rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        history_path = summary_path.parent / "history.json"
        epochs = json.loads(history_path.read_text())["epochs"] if history_path.exists() else []
        val_acc = [e["val/acc"] for e in epochs if "val/acc" in e]
        row = {c: summary.get(c) for c in COLUMNS}
        row.update(job=summary_path.parent.name, epoch_to_90pct=epoch_to_fraction(val_acc),
                   curves={"val/acc": val_acc, "val/loss": [e["val/loss"] for e in epochs if "val/loss" in e]})
        rows.append(row)
    return rows


def collect_failed(sweep: Path) -> list[dict[str, Any]]:
    """``{job, reason}`` per job under ``sweep`` that failed (``failed.json``) or left no result at all."""
    failed = []
    for record_path in sorted(sweep.rglob(FAILED)):
        record = json.loads(record_path.read_text())
        failed.append({"job": record_path.parent.name, "reason": record.get("reason", "failed")})
    for overrides in sorted(sweep.rglob(".hydra/overrides.yaml")):
        job = overrides.parent.parent
        if not (job / "summary.json").exists() and not (job / FAILED).exists():
            failed.append({"job": job.name, "reason": "no summary.json or failed.json: still running, or killed "
                                                      "(out of memory, SIGKILL); see the job's log"})
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


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A short legend entry: job number, model, weights, adapt (and seed when the sweep varies it)."""
    label = (f"{row['job'].split('_')[0]} {row['model']} {'pretrained' if row['pretrained'] else 'scratch'} "
             f"{row['adapt']}")
    return label + (f" seed {row['seed']}" if len({r["seed"] for r in rows}) > 1 else "")


def write_report(sweep: Path) -> Path:
    """Write ``report.md``, ``report.csv`` and the overlay PNGs into ``sweep``; returns the Markdown path."""
    from transfer.plots import overlay_curves

    rows, failed = collect(sweep), collect_failed(sweep)
    if not rows and not failed:
        raise ConfigError(f"No finished jobs (summary.json files) under {sweep}; pass a sweep or run directory.")
    with open(sweep / "report.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=(*COLUMNS, "status", "reason"), extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{**r, "status": "ok"} for r in rows] + [{**f, "status": "failed"} for f in failed])
    lines = [f"# Sweep report: {sweep}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    groups = seed_groups(rows)
    if groups:
        lines += ["", "## Over seeds (mean ± std)", "", "| model | pretrained | adapt | seeds | test acc | best val acc |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {g['model']} | {g['pretrained']} | {g['adapt']} | {g['seeds']} | {g['test_acc'][0]:.4f} ± "
                  f"{g['test_acc'][1]:.4f} | {g['best_val_acc'][0]:.4f} ± {g['best_val_acc'][1]:.4f} |" for g in groups]
    if failed:
        lines += ["", f"## Failed jobs ({len(failed)} of {len(rows) + len(failed)})", "", "| job | reason |",
                  "| --- | --- |"]
        lines += [f"| {f['job']} | {f['reason'].replace('|', '/')} |" for f in failed]
    for key, name in (("val/acc", "val_acc.png"), ("val/loss", "val_loss.png")) if rows else ():
        overlay_curves({_label(r, rows): r["curves"][key] for r in rows}, key.replace("val/", "validation "),
                       sweep / name)
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
            print(f"{len(failed)} job(s) of the sweep failed: " + "; ".join(f"{f['job']}: {f['reason'][:160]}"
                                                                            for f in failed), file=sys.stderr)
            sys.exit(1)


@report_errors
def main(argv: list[str] | None = None) -> Path:
    """``python -m transfer.report <sweep dir>``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise ConfigError("Usage: python -m transfer.report <sweep directory, e.g. outputs/sweeps/<date>/<time>>")
    path = write_report(Path(args[0]).expanduser())
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
