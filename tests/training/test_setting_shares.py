"""Shares and counts are validated as what they are: a fraction in (0, 1) or a whole count, never ``1.5``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY
from tests.in_process import run_tool
from transfer.core.errors import ConfigError
from transfer.training.preflight import validate


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("data.val_size=1.5", "data.val_size=1.5 must be a fraction in (0, 1) or a whole image count >= 1"),
        ("data.val_size=0", "data.val_size=0 must be a fraction in (0, 1)"),
        ("data.val_size=-0.2", "data.val_size=-0.2 must be"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5 must be a fraction in [0.0, 1.0]"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1 must be"),
    ],
)
def test_a_share_that_is_neither_fraction_nor_count_is_refused(compose_cfg, override: str, phrase: str):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    assert phrase in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["data.val_size=0.2", "data.val_size=6", "data.val_size=6.0", "trainer.limit_val_batches=0",
     "trainer.limit_val_batches=1.0", "trainer.limit_train_batches=3"],
)  # fmt: skip
def test_fractions_and_whole_counts_are_accepted(compose_cfg, override: str):
    validate(compose_cfg(override))


def test_the_command_line_refuses_it_before_the_run_directory_exists(tmp_path: Path):
    args = [a for a in TINY if not a.startswith("data.val_size")]
    proc = run_tool("transfer.run", *args, "data.val_size=1.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "data.val_size=1.5 must be" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override", ["trainer.benchmark=abc", "trainer.deterministic=maybe", "+trainer.detect_anomaly=1"]
)
def test_trainer_switches_must_be_true_or_false(compose_cfg, override: str):
    from transfer.training.preflight import problems

    assert any("must be true, false" in p for p in problems(compose_cfg(override)))
