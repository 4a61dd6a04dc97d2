"""Quiet runs: no advertising tips or library-internal warnings in a run's output; a user's own mistakes still warn."""

from __future__ import annotations

import io
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
    run_dir, proc, *_ = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert [noise for noise in NOISE if noise in output] == []
    # Lightning's lines are still there, once each on the console (Hydra's console handler), and in run.log
    assert output.count("GPU available:") == 1 and output.count("`Trainer.fit` stopped") == 1
    assert (run_dir / "run.log").read_text().count("GPU available:") == 1


@pytest.fixture
def root_console() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """The root logger with one console handler (as Hydra's job logging sets it up) writing to a buffer, and
    nothing else (pytest's capture handlers are put back afterwards)."""
    root, buffer = logging.getLogger(), io.StringIO()
    saved = root.handlers[:]
    root.handlers[:] = [logging.StreamHandler(buffer)]
    try:
        yield root, buffer
    finally:
        root.handlers[:] = saved


@pytest.fixture
def lightning_console() -> Iterator[io.StringIO]:
    """The ``lightning`` package's own console handler, writing to a buffer for the test."""
    import lightning  # noqa: F401  (its import installs the handler)

    handler = next(h for h in logging.getLogger("lightning").handlers if type(h) is logging.StreamHandler)
    buffer = io.StringIO()
    stream = handler.setStream(buffer)
    try:
        yield buffer
    finally:
        handler.setStream(stream)  # type: ignore[arg-type]


def test_a_lightning_line_prints_once_where_the_root_logger_has_a_console(root_console, lightning_console):
    from transfer.core.quiet import quiet

    quiet()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    _, root_buffer = root_console
    assert root_buffer.getvalue().count("GPU available") == 1 and lightning_console.getvalue() == ""


def test_without_a_root_console_lightnings_own_handler_prints_the_line(root_console, lightning_console):
    from transfer.core.quiet import quiet

    root, _ = root_console
    root.handlers[:] = []  # a notebook or a plain script: nobody configured logging
    quiet()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    assert lightning_console.getvalue().count("GPU available") == 1
