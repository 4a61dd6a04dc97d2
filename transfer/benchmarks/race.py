"""Time-to-accuracy race: this framework's default recipe against the plain loop, same data, from a cold start.

    python -m transfer.benchmarks time_to_accuracy=true [skip_speed=true]     (or python -m transfer.benchmarks.race)

For CIFAR-10 the default recipe (``python -m transfer.run`` with no overrides but the data root) races
:mod:`transfer.benchmarks.plain_loop` given the same number of epochs; for the clothing photos both train 3
epochs at 128 px. The two run one after the other (never together: they would share the cores), each as its
own process from an empty decode cache. Every epoch each prints its test accuracy and the wall-clock time; the
time spent on those extra test evaluations is subtracted, so each side is charged for what it would do on its
own (data decoding, training, and for the framework its per-epoch validation). On a CPU the table gives
accuracy at 2, 4, 8 and 15 minutes (the last epoch finished by then) and the time to 85/88/90%; on a GPU at 30 s,
60 s and 3 minutes and the time to 94/96/97%, under airbench's published A100 figures, named as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from transfer.conf import CONF_DIR

TIMELINE = "+callbacks.timeline._target_=transfer.benchmarks.timeline.TestTimeline"


@dataclass(frozen=True)
class Scale:
    """Where the race's table reads each side's timeline.

    Attributes:
        minutes: the time points (accuracy of the last epoch finished by each).
        thresholds: the accuracies whose first time is reported.
        reference: a published result printed above the table, or ``""``.
    """

    minutes: tuple[float, ...]
    thresholds: tuple[float, ...]
    reference: str = ""


# A 2-core CPU trains Lite0 at 100-400 images/s: 2 epochs of CIFAR-10 take 10-15 minutes and reach 85-86%.
CPU_SCALE = Scale((2, 4, 8, 15), (0.85, 0.88, 0.90))
# A GPU is held to what fast CIFAR-10 training reaches there. The reference is KellerJordan/cifar10-airbench's
# README (torch 2.4.1, one 400 W A100), training from scratch; it is not run here.
GPU_SCALE = Scale(
    (0.5, 1, 3),
    (0.94, 0.96, 0.97),
    "Published, not run here: airbench reaches 94.01% in 2.59 s (airbench94_muon.py) and 96.00% in 27.3 s "
    "(airbench96_faster.py) from scratch on one A100; a standard ResNet-18 from scratch 96.0% in 7 min there "
    "(github.com/KellerJordan/cifar10-airbench).",
)


def race_scale(gpu: bool | None = None) -> Scale:
    """The scale for the device the race trains on (``gpu=None``: a CUDA GPU when one is visible)."""
    return GPU_SCALE if (torch.cuda.is_available() if gpu is None else gpu) else CPU_SCALE


def default_epochs() -> int:
    """``trainer.max_epochs`` of the default config: the plain loop gets the same number."""
    return int(OmegaConf.load(Path(CONF_DIR) / "trainer" / "default.yaml").max_epochs)


def run_timeline(cmd: list[str], label: str) -> dict[str, Any]:
    """Run ``cmd`` from a cold decode cache; collect its per-epoch ``{"timeline": ...}`` JSON lines.

    Args:
        cmd: the command line.
        label: a name for progress output.

    Returns:
        ``{"rows": [{"epoch", "seconds", "test_acc"}], "wall_s", "exit_code", "command"}``; ``seconds`` is the
        time since the process started, less the time spent in the extra test evaluations.
    """
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRANSFER_CACHE": cache, "HYDRA_FULL_ERROR": "1"}
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        rows = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith('{"timeline"'):
                continue
            row = json.loads(line)
            rows.append(
                {
                    "epoch": row["timeline"],
                    "test_acc": row["test_acc"],
                    "seconds": round(row["unix_time"] - start - row["eval_seconds"], 1),
                }
            )
            print(
                f"  {label}: epoch {rows[-1]['epoch']}, {rows[-1]['seconds'] / 60:.1f} min, test {row['test_acc']:.4f}",
                flush=True,
            )
        code = proc.wait()
    return {"rows": rows, "wall_s": round(time.time() - start, 1), "exit_code": code, "command": " ".join(cmd)}


def accuracy_at(rows: list[dict[str, Any]], minutes: float) -> float | None:
    """Test accuracy of the last epoch finished within ``minutes``."""
    done = [r["test_acc"] for r in rows if r["seconds"] <= minutes * 60]
    return done[-1] if done else None


def time_to(rows: list[dict[str, Any]], threshold: float) -> float | None:
    """Minutes until an epoch first reached ``threshold`` test accuracy."""
    return next((r["seconds"] / 60 for r in rows if r["test_acc"] >= threshold), None)


def commands(cifar: Path, clothing: Path | None, out: Path) -> dict[str, dict[str, list[str]]]:
    """The race's command lines, per dataset: ``{"ours": [...], "plain": [...]}``."""
    py, plain = sys.executable, [sys.executable, "-m", "transfer.benchmarks.plain_loop"]
    quiet = ["trainer.enable_progress_bar=false", TIMELINE]
    races = {
        "cifar10": {
            "ours": [py, "-m", "transfer.run", f"data.root={cifar}", f"hydra.run.dir={out / 'cifar10'}", *quiet],
            "plain": [*plain, "--data", str(cifar), "--epochs", str(default_epochs())],
        }
    }
    if clothing is not None:
        races["clothing-10"] = {
            "ours": [
                py,
                "-m",
                "transfer.run",
                "data=imagefolder",
                f"data.root={clothing}",
                "data.image_size=128",
                "trainer.max_epochs=3",
                f"hydra.run.dir={out / 'clothing'}",
                *quiet,
            ],
            "plain": [*plain, "--data", str(clothing), "--epochs", "3", "--size", "128", "--batch-size", "32"],
        }
    return races


def _fmt(value: float | None, pct: bool) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if pct else _duration(value)


def _duration(minutes: float) -> str:
    return f"{minutes * 60:.1f} s" if minutes < 1 else f"{minutes:.1f} min"


def _point(minutes: float) -> str:
    return f"{minutes * 60:g} s" if minutes < 1 else f"{minutes:g} min"


def race_table(results: dict[str, dict[str, dict[str, Any]]], scale: Scale = CPU_SCALE) -> str:
    """Markdown: per dataset and side, accuracy at each time point, time to each threshold, final accuracy.

    Args:
        results: ``{data: {side: {"rows": timeline}}}`` as :func:`run_timeline` returns them.
        scale: the time points and thresholds (:func:`race_scale`); its reference, if any, opens the text.
    """
    head = [
        "data",
        "side",
        *(f"acc @{_point(m)}" for m in scale.minutes),
        *(f"to {t:.0%}" for t in scale.thresholds),
        "final (epochs, min)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for data, sides in results.items():
        for side, res in sides.items():
            rows = res["rows"]
            final = (
                f"{rows[-1]['test_acc'] * 100:.2f}% ({rows[-1]['epoch']}, {rows[-1]['seconds'] / 60:.1f})"
                if rows
                else "failed"
            )
            cells = [
                data,
                side,
                *(_fmt(accuracy_at(rows, m), True) for m in scale.minutes),
                *(_fmt(time_to(rows, t), False) for t in scale.thresholds),
                final,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return (f"{scale.reference}\n\n" if scale.reference else "") + "\n".join(lines)


def race(cifar: Path, clothing: Path | None) -> dict[str, Any]:
    """Run every race and write ``outputs/benchmarks/race-<time>.{md,json}``.

    Args:
        cifar: CIFAR-10 image folders (``train/``, ``test/``).
        clothing: the clothing-10 folders, or ``None`` to skip that race.

    Returns:
        ``{"table": markdown, "results": ...}``.
    """
    out = Path.cwd() / "outputs" / "benchmarks" / time.strftime("race-%Y-%m-%d_%H-%M-%S")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for data, sides in commands(cifar, clothing, out).items():
        results[data] = {side: run_timeline(cmd, f"{data} {side}") for side, cmd in sides.items()}
    text = race_table(results, race_scale())
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.md").write_text(text + "\n")
    (out.parent / f"{out.name}.json").write_text(json.dumps(results, indent=1))
    print("\n" + text + f"\n\nwritten to {out.parent / out.name}.md and .json", flush=True)
    return {"table": text, "results": results}


def main() -> None:
    """``python -m transfer.benchmarks.race [CIFAR_DIR [CLOTHING_DIR]]``."""
    home = Path.home() / ".cache" / "transfer-data"
    cifar = Path(sys.argv[1]) if len(sys.argv) > 1 else home / "cifar10"
    clothing = Path(sys.argv[2]) if len(sys.argv) > 2 else home / "clothing-10"
    race(cifar.expanduser(), clothing.expanduser() if clothing.expanduser().is_dir() else None)


if __name__ == "__main__":
    main()
