"""The sweep report, from fabricated run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from transfer.core.errors import ConfigError
from transfer.experiments.report import epoch_to_fraction, write_report


def fake_job(
    root: Path,
    name: str,
    model: str,
    seed: int,
    val_accs: list[float],
    test_acc: float,
    overrides: list[str] | None = None,
) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    if overrides is not None:  # what Hydra records for every job of a sweep
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "summary.json").write_text(
        json.dumps(
            {
                "model": model,
                "pretrained": True,
                "adapt": "native",
                "seed": seed,
                "params": 100,
                "epochs_run": len(val_accs),
                "best_val_acc": max(val_accs),
                "best_epoch": val_accs.index(max(val_accs)) + 1,  # numbered from 1, as train() writes it
                "test_acc": test_acc,
                "train_seconds": 10.04,
                "images_per_second": 50.0,
            }
        )
    )
    (job / "history.json").write_text(
        json.dumps(
            {
                "step_loss": [1.0],
                "epochs": [{"epoch": i, "val/acc": a, "val/loss": 1 - a} for i, a in enumerate(val_accs, start=1)],
            }
        )
    )


def test_epoch_to_ninety_percent_of_best():
    assert epoch_to_fraction([0.1, 0.5, 0.85, 0.9, 0.8]) == 3  # 0.85 >= 0.9 * 0.9
    assert epoch_to_fraction([]) is None
    assert epoch_to_fraction([0.1, 0.85, 0.9], epochs=[2, 4, 6]) == 4  # history.json's own epoch numbers


def test_report_has_a_row_per_job_seed_statistics_and_figures(tmp_path: Path):
    fake_job(tmp_path, "0", "resnet18", 1, [0.5, 0.7, 0.8], 0.78)
    fake_job(tmp_path, "1", "resnet18", 2, [0.4, 0.6, 0.9], 0.82)
    fake_job(tmp_path, "2", "alexnet", 1, [0.3, 0.5], 0.55)
    md = write_report(tmp_path).read_text()
    rows = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["resnet18", "resnet18", "alexnet"]
    assert rows[0]["epoch_to_90pct"] == "3" and rows[2]["test_acc"] == "0.55"  # the CSV: fractions, unrounded
    assert rows[0]["best_epoch"] == "3" and rows[0]["train_seconds"] == "10.04"
    # report.md for reading: % with two decimals, seconds to a tenth, epochs numbered as best_epoch is
    assert "| 0 |  | resnet18 | True | native | 1 | 100 | 3 | 80.00% | 3 | 78.00% | 3 | 10.0 s | 50 |" in md
    assert [r["overrides"] for r in rows] == ["", "", ""]  # no overrides recorded: the label falls back to the model
    over_seeds = md.split("## Over seeds")[1]
    assert "resnet18 | True | native | 2 | 80.00 ± 2.83%" in over_seeds  # mean and sample std of 0.78, 0.82
    assert "alexnet" not in over_seeds.split("![")[0]  # one seed: no statistics row
    assert all((tmp_path / png).read_bytes()[:4] == b"\x89PNG" for png in ("val_acc.png", "val_loss.png"))


def test_jobs_are_labelled_by_the_overrides_that_set_them_apart_in_job_order(tmp_path: Path):
    common = ["model=resnet18", "data.root=/data"]
    for num, lr in ((0, "1e-3"), (1, "3e-3"), (2, "1e-2"), (10, "3e-2")):  # 10 sorts after 2, as a number
        fake_job(tmp_path, str(num), "resnet18", 1, [0.5, 0.6], 0.5, [*common, f"optimizer.lr={lr}", "seed=1"])
    fake_job(tmp_path, "3", "resnet18", 2, [0.5, 0.7], 0.6, [*common, "optimizer.lr=1e-3", "seed=2"])
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # killed: only Hydra's record of the job is there
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text("- model=resnet18\n- data.root=/data\n- optimizer.lr=9\n")
    md = write_report(tmp_path).read_text()
    rows = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "ok"),
        ("1", "ok"),
        ("2", "ok"),
        ("3", "ok"),
        ("10", "ok"),
        ("4", "failed"),
    ]
    assert [r["overrides"] for r in rows] == [
        "optimizer.lr=1e-3 seed=1",
        "optimizer.lr=3e-3 seed=1",
        "optimizer.lr=1e-2 seed=1",
        "optimizer.lr=1e-3 seed=2",
        "optimizer.lr=3e-2 seed=1",
        "optimizer.lr=9",
    ]
    assert "Overrides shared by every job: `model=resnet18 data.root=/data`" in md
    assert "| 3 | optimizer.lr=1e-3 seed=2 | resnet18 |" in md
    assert "| 4 | optimizer.lr=9 | no summary.json" in md.split("## Failed jobs")[1]


def test_a_folder_without_jobs_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="No finished jobs"):
        write_report(tmp_path)
