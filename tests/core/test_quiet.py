"""Quiet runs: no advertising tips or library-internal warnings in a run's output; a user's own mistakes still warn."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TINY

NOISE = ("💡 Tip", "litlogger", "litmodels", "LeafSpec", "was configured so 100% of the batches")


@pytest.fixture
def lightning_log() -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches Lightning's own handlers (Lightning stops propagation to the root logger when
    it is imported before logging is configured, so ``caplog`` alone would not see them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_a_run_logs_no_tips_or_library_deprecations_but_warns_about_the_users_own_setting(
    tiny_models, compose_cfg, tiny_cifar: Path, tmp_path: Path, lightning_log: list[logging.LogRecord]
):
    from transfer.core.quiet import quiet
    from transfer.training.train import train

    settings = [a for a in TINY if not a.startswith(("trainer.max_epochs", "trainer.log_every_n_steps"))]
    cfg = compose_cfg(
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "~callbacks.ema",
        f"data.root={tiny_cifar}",
        *settings,
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=50",
    )  # a user's setting longer than the 3-step epoch
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()  # no filters of pytest's or pyproject's: only quiet() may hide anything
        quiet()  # (pytest runs each test in a catch_warnings block, which dropped the filters installed at import)
        train(cfg, tmp_path / "run")
    output = [str(w.message) for w in shown] + [r.getMessage() for r in lightning_log]
    assert not [line for line in output if any(noise in line for noise in NOISE)]
    assert any("smaller than the logging interval Trainer(log_every_n_steps=50)" in line for line in output)
    assert any(line.startswith("GPU available:") for line in output)  # Lightning's other INFO lines still show


def test_a_command_line_run_prints_no_tips_or_library_deprecations(finished_run):
    _, proc, *_ = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert [noise for noise in NOISE if noise in output] == []
    assert "GPU available:" in proc.stderr  # the check reads Lightning's output, which is still there
