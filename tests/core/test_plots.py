"""Per-epoch figures: whole-number epoch ticks (numbered from 1) and the best epoch marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from transfer.core import plots


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions would save, kept open for the test to read."""
    figures: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, title="", dpi=120: figures.append(fig))
    return figures


def _texts(fig: Any) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_a_one_epoch_run_has_one_whole_epoch_tick_and_its_best_marked(drawn: list[Any], tmp_path: Path):
    rows = [{"epoch": 1, "train/acc": 0.9, "val/acc": 0.945, "train/loss": 0.3, "val/loss": 0.2}]
    plots.plot_epoch_curves(rows, tmp_path / "curves.png", "one epoch", unfreeze_epoch=0, best_epoch=1)
    (fig,) = drawn
    assert [list(ax.get_xticks()) for ax in fig.axes] == [[1.0], [1.0]]
    assert "best: epoch 1, 94.50%" in _texts(fig)


def test_long_runs_get_whole_number_ticks_and_the_best_epoch_of_the_rows(drawn: list[Any], tmp_path: Path):
    accs = [0.1 + 0.02 * i for i in range(30)]
    accs[20] = 0.99
    rows = [{"epoch": i + 1, "val/acc": a, "val/loss": 1 - a} for i, a in enumerate(accs)]
    plots.plot_epoch_curves(rows, tmp_path / "curves.png", best_epoch=21)
    (fig,) = drawn
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())
    assert "best: epoch 21, 99.00%" in _texts(fig)


def test_a_budget_run_marks_its_final_checkpoint_as_final(drawn: list[Any], tmp_path: Path):
    rows = [{"epoch": 1, "val/acc": 0.9, "val/loss": 0.4}, {"epoch": 2, "val/acc": 0.8, "val/loss": 0.5}]
    plots.plot_epoch_curves(rows, tmp_path / "curves.png", best_epoch=2, kept="final")
    (fig,) = drawn
    assert "final: epoch 2, 80.00%" in _texts(fig) and not any(t.startswith("best") for t in _texts(fig))


def test_the_sweep_overlay_marks_each_jobs_best_epoch(drawn: list[Any], tmp_path: Path):
    curves = {"0: lr=1e-3": ([1, 2, 3], [0.5, 0.8, 0.7]), "1: lr=1e-2": ([1, 2], [0.6, 0.65])}
    plots.overlay_curves(curves, "validation acc", tmp_path / "val_acc.png", best={"0: lr=1e-3": 2, "1: lr=1e-2": 2})
    (fig,) = drawn
    assert sorted(_texts(fig)) == ["best 2", "best 2"]
    assert list(fig.axes[0].get_xticks()) == [1.0, 2.0, 3.0]
