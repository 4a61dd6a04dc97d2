"""budget=<duration> as config: the duration parsed, the preflight's refusals, and the open-ended run it becomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.in_process import run_tool
from transfer.core.errors import ConfigError
from transfer.training.budget_config import budgeted_config, parse_duration
from transfer.training.preflight import validate


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1h2m3s", 3723), ("1.5m", 90), ("45", 45), (20, 20)],
)
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["15x", "abc", "", "m", "1m30", "-5", 0, -3, True, "h30m"])
def test_anything_else_is_one_paragraph_naming_the_setting(bad):
    with pytest.raises(ConfigError, match=r"budget=.*15m.*budget=null") as err:
        parse_duration(bad)
    assert "\n" not in str(err.value)
    assert parse_duration(None) is None


def test_preflight_refuses_plateau_and_a_bad_duration_before_anything_is_built(compose_cfg):
    with pytest.raises(ConfigError, match=r"scheduler=ReduceLROnPlateau.*per epoch.*onecycle") as err:
        validate(compose_cfg("budget=2m", "scheduler=plateau"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"budget='2 weeks'"):
        validate(compose_cfg("budget='2 weeks'"))
    with pytest.raises(ConfigError, match="cache_features"):
        validate(compose_cfg("budget=2m", "finetune.cache_features=true"))
    validate(compose_cfg("budget=1h30m", "scheduler=cosine"))
    validate(compose_cfg("budget=null", "scheduler=plateau"))


def test_a_budget_makes_the_trainer_open_ended_and_every_per_step_schedule_per_step(compose_cfg):
    cfg = compose_cfg("budget=90s", "scheduler=cosine")
    run = budgeted_config(cfg)
    assert run.trainer.max_epochs == -1 and run.trainer.check_val_every_n_epoch is None
    assert run.scheduler.interval == "step" and run.scheduler.T_max == run.trainer.max_steps
    assert cfg.trainer.max_epochs == 2 and cfg.scheduler.interval == "epoch"  # the composed config is untouched
    plain = compose_cfg()
    assert budgeted_config(plain) is plain


def test_the_command_refuses_a_bad_budget_with_exit_status_2(tiny_cifar: Path, tmp_path: Path):
    out = run_tool("transfer.run", f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'run'}", "budget=soon")
    assert out.returncode == 2 and "budget='soon'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_config_side_imports_no_lightning():
    # The preflight checks a budget before the heavy imports; this module is what it loads for that.
    import subprocess
    import sys

    probe = "import sys, transfer.training.budget_config; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-1000:]
