"""Hydra's composition errors reach the user as one paragraph, exit status 2, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.in_process import run_tool


def refused(tmp_path: Path, *args: str, tool: str = "transfer.run"):
    proc = run_tool(tool, *args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "error: " in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # refused before Hydra's run
    return " ".join(proc.stderr.split())


def test_a_typo_in_a_key_names_the_closest_setting(tmp_path: Path):
    text = refused(tmp_path, "trainer.max_epoch=1")
    assert "no setting trainer.max_epoch" in text and "Did you mean trainer.max_epochs?" in text


def test_a_trainer_argument_the_config_does_not_set_is_named_with_its_plus_form(tmp_path: Path):
    text = refused(tmp_path, "trainer.detect_anomaly=true")
    assert "trainer.detect_anomaly is a lightning.Trainer argument" in text and "+trainer.detect_anomaly=true" in text


def test_an_unknown_group_option_lists_the_options(tmp_path: Path):
    text = refused(tmp_path, "optimizer=adamm")
    assert "no optimizer option 'adamm'" in text and "Did you mean adam or adamw?" in text
    assert "The options are adam, adamw, sgd." in text


def test_every_option_of_a_swept_group_is_checked_before_the_first_job(tmp_path: Path):
    text = refused(tmp_path, "-m", "model=resnet18,alexnt", "seed=1,2")
    assert "no model option 'alexnt'" in text and "Did you mean alexnet?" in text


def test_an_override_hydra_cannot_parse_says_how_to_quote(tmp_path: Path):
    text = refused(tmp_path, "trainer.max_epochs=[1")
    assert "Hydra cannot parse this override" in text and "key='a value, with commas'" in text


def test_the_tools_check_their_own_config(tmp_path: Path):
    text = refused(tmp_path, "sweep=x", "sweeep=y", tool="transfer.report")
    assert "transfer.report has no setting sweeep" in text and "Did you mean sweep?" in text


@pytest.mark.parametrize("args", [("--help",), ("--cfg", "job", "seed=3")])
def test_help_and_printing_the_config_are_not_in_the_way(args: tuple[str, ...]):
    proc = run_tool("transfer.run", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_full_errors_leave_hydra_its_own_message(tmp_path: Path):
    proc = run_tool("transfer.run", "trainer.max_epoch=1", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Could not override 'trainer.max_epoch'" in proc.stderr


def test_help_lists_the_groups_a_run_takes_and_not_the_tools_configs():
    out = run_tool("transfer.run", "--help").stdout
    assert "optimizer: adam, adamw, sgd" in out and "model: alexnet, " in out
    assert "tools:" not in out and "model/_base" not in out
