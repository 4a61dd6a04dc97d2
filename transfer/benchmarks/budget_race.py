"""The race at budgets: for each budget B (minutes), ``python -m transfer.run budget=Bm`` against the plain loop made
budget-aware the simple way (``plain_loop --budget``: it times 20 probe steps after decoding its data and sizes its
one-cycle schedule so that training and its final test end at B), on the same data, one after the other (which
side goes first alternates from budget to budget on each data set).

    python -m transfer.benchmarks time_to_accuracy=true skip_speed=true budgets=[2,4,8,15] [clothing_root=DIR]
        [seeds=[0,1,2]] [data_root=null: the photos alone]

Both sides start cold (an empty decode cache each) and everything from the process start counts. Before the
first run every image file is read once, so that neither side pays for a cold disk the other then finds warm (60k
small JPEGs off a cold disk took 110 s, against 8.6 s from the page cache). Each side tests
once, at the end; the table gives both sides' test accuracy and wall time per budget, on CIFAR-10 and on the
clothing photos (as in :mod:`transfer.benchmarks.race`: 128 px, batch 32 for the plain loop). With ``seeds``, every
side runs once per seed at every budget and the table gives each side's mean ± std: on the 372 clothing test
photos one setting moved by 3.2 points between two seeds at 4 minutes (docs/recipe.md), more than the leads the
race is held to.
"""

from __future__ import annotations

import json
import os
import statistics
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


def parse_seeds(value: Any) -> list[int | None]:
    """``seeds=[0,1,2]``: distinct integers; ``null``: one run per side, each with its own default seed.

    Raises:
        ConfigError: anything else.
    """
    if value is None:
        return [None]
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    ok = values and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok or len(set(values)) != len(values):
        raise ConfigError(
            f"seeds={value!r}: pass a list of distinct integer seeds, e.g. seeds=[0,1,2] (seeds=null runs each "
            f"side once with its own default seed)."
        )
    return [int(v) for v in values]


def budget_commands(
    cifar: Path | None,
    clothing: Path | None,
    out: Path,
    minutes: float,
    ours_extra: Sequence[str] = (),
    plain_extra: Sequence[str] = (),
    seed: int | None = None,
) -> dict[str, dict[str, list[str]]]:
    """The two command lines per data set for one budget: ``{"cifar10": {"ours": [...], "plain": [...]}, ...}``.

    ``seed`` (``None``: each side's default) goes to both sides and names ours' run directory; a data set whose
    folders are ``None`` has no entry.
    """
    py, seconds = sys.executable, f"{minutes * 60:g}"
    seeded = ([f"seed={seed}"], ["--seed", str(seed)]) if seed is not None else ([], [])
    ours = [py, "-m", "transfer.run", f"budget={seconds}", *QUIET, *seeded[0], *ours_extra]
    plain = [py, "-m", "transfer.benchmarks.plain_loop", "--budget", seconds, *seeded[1], *plain_extra]
    label = f"{minutes:g}min" + (f"-seed{seed}" if seed is not None else "")
    races = {}
    if cifar is not None:
        races["cifar10"] = {
            "ours": [*ours, f"data.root={cifar}", f"hydra.run.dir={out / f'cifar10-{label}'}"],
            "plain": [*plain, "--data", str(cifar)],
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


def _acc(runs: list[dict[str, Any]]) -> str:
    """One run's test accuracy, or the mean ± sample std of several (``n`` and the failures named)."""
    accs = [r["test_acc"] for r in runs if r.get("test_acc") is not None]
    failed = len(runs) - len(accs)
    if len(runs) == 1 or not accs:
        return "failed" if failed else f"{accs[0] * 100:.2f}%"
    spread = statistics.stdev(accs) * 100 if len(accs) > 1 else 0.0
    text = f"{statistics.mean(accs) * 100:.2f} ± {spread:.2f}% (n={len(accs)})"
    return text + (f", {failed} failed" if failed else "")


def _wall(runs: list[dict[str, Any]]) -> str:
    return f"{statistics.mean(r['wall_s'] for r in runs) / 60:.2f} min"


def budget_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per data set and budget, both sides' test accuracy and wall time (means over seeds)."""
    head = ["data", "budget", "ours test acc", "ours wall", "plain test acc", "plain wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["data"], row["minutes"]), []).append(row)
    for (data, minutes), rows in groups.items():
        ours, plain = [r["ours"] for r in rows], [r["plain"] for r in rows]
        cells = [data, f"{minutes:g} min", _acc(ours), _wall(ours), _acc(plain), _wall(plain)]
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
    cifar: Path | None,
    clothing: Path | None,
    budgets: Sequence[float],
    ours_extra: Sequence[str] = (),
    plain_extra: Sequence[str] = (),
    seeds: Sequence[int | None] = (None,),
) -> dict[str, Any]:
    """Race at every budget (minutes); write ``outputs/benchmarks/race-budgets-<time>.{md,json}``.

    Args:
        cifar: CIFAR-10 image folders, or ``None`` to race the photos alone.
        clothing: the clothing-10 folders, or ``None`` to skip them.
        budgets: the budgets in minutes.
        ours_extra: more ``transfer.run`` overrides (the tests' tiny settings).
        plain_extra: more plain loop arguments.
        seeds: each side runs once per seed at every budget (``None``: its default seed).

    Returns:
        ``{"table": markdown, "results": [{"data", "minutes", "seed", "ours", "plain"}]}``.
    """
    out = Path.cwd() / "outputs" / "benchmarks" / time.strftime("race-budgets-%Y-%m-%d_%H-%M-%S")
    for root in (cifar, clothing):
        if root is not None:
            read_once(root)
    results = []
    for b, minutes in enumerate(budgets):
        for r, seed in enumerate(seeds):
            commands = budget_commands(cifar, clothing, out, minutes, ours_extra, plain_extra, seed)
            for d, (data, sides) in enumerate(commands.items()):
                # which side runs first alternates from budget to budget and seed to seed on each data set, so
                # that a machine slowing down or speeding up over the race does not always favour the same side
                first, second = ("ours", "plain") if (b + r + d) % 2 == 0 else ("plain", "ours")
                label = "" if seed is None else f", seed {seed}"
                print(f"  {data} at {minutes:g} min{label}: {first}, then {second}", flush=True)
                runs = {side: run_cold(sides[side]) for side in (first, second)}
                ours, plain = ours_result(sides["ours"], runs["ours"]), plain_result(runs["plain"])
                results.append({"data": data, "minutes": minutes, "seed": seed, "ours": ours, "plain": plain})
    text = budget_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.md").write_text(text + "\n")
    (out.parent / f"{out.name}.json").write_text(json.dumps(results, indent=1))
    print("\n" + text + f"\n\nwritten to {out.parent / out.name}.md and .json", flush=True)
    return {"table": text, "results": results}
