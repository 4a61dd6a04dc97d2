"""The race at budgets: for each budget B (minutes), ``python -m transfer.run budget=Bm`` against the plain loop made
budget-aware the simple way (``plain_loop --budget``: it times 20 probe steps after decoding its data and sizes its
one-cycle schedule so that training and its final test end at B), on the same data, one after the other (which
side goes first alternates from budget to budget on each data set).

    python -m transfer.benchmarks time_to_accuracy=true skip_speed=true budgets=[2,4,8,15] [clothing_root=DIR]

Both sides start cold (an empty decode cache each) and everything from the process start counts. Before the
first run every image file is read once, so that neither side pays for a cold disk the other then finds warm (60k
small JPEGs off a cold disk took 110 s, against 8.6 s from the page cache). Each side tests
once, at the end; the table gives both sides' test accuracy and wall time per budget, on CIFAR-10 and on the
clothing photos (as in :mod:`transfer.benchmarks.race`: 128 px, batch 32 for the plain loop).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from transfer.core.errors import ConfigError

QUIET = ["trainer.enable_progress_bar=false"]


def parse_budgets(value: Any) -> list[float]:
    """``budgets=[2,4,8,15]``: positive numbers of minutes.

    Raises:
        ConfigError: anything else.
    """
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    ok = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        raise ConfigError(
            f"budgets={value!r}: pass a list of positive budgets in minutes, e.g. budgets=[2,4,8,15] "
            f"(budgets=null runs the race by epochs)."
        )
    return [float(v) for v in values]


def budget_commands(
    cifar: Path,
    clothing: Path | None,
    out: Path,
    minutes: float,
    ours_extra: Sequence[str] = (),
    plain_extra: Sequence[str] = (),
) -> dict[str, dict[str, list[str]]]:
    """The two command lines per data set for one budget: ``{"cifar10": {"ours": [...], "plain": [...]}, ...}``."""
    py, seconds = sys.executable, f"{minutes * 60:g}"
    ours = [py, "-m", "transfer.run", f"budget={seconds}", *QUIET, *ours_extra]
    plain = [py, "-m", "transfer.benchmarks.plain_loop", "--budget", seconds, *plain_extra]
    label = f"{minutes:g}min"
    races = {
        "cifar10": {
            "ours": [*ours, f"data.root={cifar}", f"hydra.run.dir={out / f'cifar10-{label}'}"],
            "plain": [*plain, "--data", str(cifar)],
        }
    }
    if clothing is not None:
        races["clothing-10"] = {
            "ours": [
                *ours,
                "data=imagefolder",
                f"data.root={clothing}",
                "data.image_size=128",
                f"hydra.run.dir={out / f'clothing-{label}'}",
            ],
            "plain": [*plain, "--data", str(clothing), "--size", "128", "--batch-size", "32"],
        }
    return races


def run_cold(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` from an empty decode cache; its exit status, wall time and the last lines of its output."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRANSFER_CACHE": cache, "HYDRA_FULL_ERROR": "1"}
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return {
        "wall_s": round(time.time() - start, 1),
        "exit_code": proc.returncode,
        "command": " ".join(cmd),
        "stdout": proc.stdout.splitlines()[-20:],
        "stderr": proc.stderr.splitlines()[-20:],
    }


def ours_result(cmd: list[str], run: dict[str, Any]) -> dict[str, Any]:
    """``test_acc`` and the plan from the run directory's ``summary.json``."""
    run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
    summary_file = run_dir / "summary.json"
    if run["exit_code"] != 0 or not summary_file.is_file():
        return {**run, "test_acc": None}
    summary = json.loads(summary_file.read_text())
    return {**run, "test_acc": summary.get("test_acc"), "plan": summary.get("budget")}


def plain_result(run: dict[str, Any]) -> dict[str, Any]:
    """``test_acc`` and the plan from the plain loop's ``{"budgeted": ...}`` line."""
    lines = [line for line in run["stdout"] if line.startswith('{"budgeted"')]
    if run["exit_code"] != 0 or not lines:
        return {**run, "test_acc": None}
    plan = json.loads(lines[-1])["budgeted"]
    return {**run, "test_acc": plan.get("test_acc"), "plan": plan}


def _acc(value: float | None) -> str:
    return "failed" if value is None else f"{value * 100:.2f}%"


def budget_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per data set and budget, both sides' test accuracy and wall time."""
    head = ["data", "budget", "ours test acc", "ours wall", "plain test acc", "plain wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        ours, plain = row["ours"], row["plain"]
        cells = [
            row["data"],
            f"{row['minutes']:g} min",
            _acc(ours.get("test_acc")),
            f"{ours['wall_s'] / 60:.2f} min",
            _acc(plain.get("test_acc")),
            f"{plain['wall_s'] / 60:.2f} min",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_once(root: Path) -> int:
    """Read every file under ``root`` once (into the OS page cache); the bytes read."""
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def budget_race(
    cifar: Path,
    clothing: Path | None,
    budgets: Sequence[float],
    ours_extra: Sequence[str] = (),
    plain_extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Race at every budget (minutes); write ``outputs/benchmarks/race-budgets-<time>.{md,json}``.

    Args:
        cifar: CIFAR-10 image folders.
        clothing: the clothing-10 folders, or ``None`` to skip them.
        budgets: the budgets in minutes.
        ours_extra: more ``transfer.run`` overrides (the tests' tiny settings).
        plain_extra: more plain loop arguments.

    Returns:
        ``{"table": markdown, "results": [{"data", "minutes", "ours", "plain"}]}``.
    """
    out = Path.cwd() / "outputs" / "benchmarks" / time.strftime("race-budgets-%Y-%m-%d_%H-%M-%S")
    for root in (cifar, clothing):
        if root is not None:
            read_once(root)
    results = []
    for b, minutes in enumerate(budgets):
        for d, (data, sides) in enumerate(
            budget_commands(cifar, clothing, out, minutes, ours_extra, plain_extra).items()
        ):
            # which side runs first alternates from budget to budget on each data set, so that a machine slowing
            # down or speeding up over the race does not always favour the same side
            first, second = ("ours", "plain") if (b + d) % 2 == 0 else ("plain", "ours")
            print(f"  {data} at {minutes:g} min: {first}, then {second}", flush=True)
            runs = {side: run_cold(sides[side]) for side in (first, second)}
            ours, plain = ours_result(sides["ours"], runs["ours"]), plain_result(runs["plain"])
            results.append({"data": data, "minutes": minutes, "ours": ours, "plain": plain})
    text = budget_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.md").write_text(text + "\n")
    (out.parent / f"{out.name}.json").write_text(json.dumps(results, indent=1))
    print("\n" + text + f"\n\nwritten to {out.parent / out.name}.md and .json", flush=True)
    return {"table": text, "results": results}
