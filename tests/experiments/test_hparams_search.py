"""Hyperparameter search: a real 3-trial Optuna study on tiny data, stored in SQLite, continued after a stop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import make_image_folder
from tests.in_process import run_tool
from transfer.conf import CONF_DIR

optuna = pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

SEARCHED = (
    "optimizer.lr",
    "finetune.backbone_lr_ratio",
    "finetune.unfreeze_at_epoch",
    "label_smoothing",
    "optimizer.weight_decay",
)
TINY_SEARCH = [
    "model=lenet5",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "data.val_size=6",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_search_spaces_name_real_config_keys(name: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={name}", "data.root=/x"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(SEARCHED) <= set(params)
    for key in params:  # every searched parameter exists in the composed config, so no trial fails on a typo
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.storage.startswith("sqlite:///")
    assert cfg.hydra.sweeper.storage.endswith("/optuna.db")
    assert cfg.hydra.callbacks.sweep_report._target_ == "transfer.experiments.hparams_search.StudyReport"


def _study(sweep: Path, name: str = "imagefolder"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}")


def test_a_three_trial_study_maximises_best_val_acc_and_continues_after_an_interruption(tmp_path: Path):
    root = make_image_folder(tmp_path / "tiny", {"train": 12, "test": 4})
    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=imagefolder", f"data.root={root}", f"hydra.sweep.dir={sweep}", *TINY_SEARCH]
    proc = run_tool("transfer.run", *args, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]

    study = _study(sweep)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(set(SEARCHED) <= set(t.params) and 1e-5 <= t.params["optimizer.lr"] <= 1e-2 for t in trials)
    # The objective is each trial's best validation accuracy, as its run recorded it.
    recorded = sorted(json.loads(p.read_text())["best_val_acc"] for p in sweep.glob("trial*/summary.json"))
    assert sorted(t.value for t in trials) == pytest.approx(recorded) and len(recorded) == 3
    report = (sweep / "report.md").read_text()
    assert f"Best trial {study.best_trial.number}: best val accuracy {100 * study.best_value:.2f}%" in report
    # report.md for reading (%, seconds to a tenth), study.csv machine-readable (the fraction, named)
    assert f"| {study.best_trial.number} | COMPLETE | {100 * study.best_value:.2f}% | " in report
    study_rows = list(csv.DictReader((sweep / "study.csv").read_text().splitlines()))
    best_row = next(r for r in study_rows if r["trial"] == str(study.best_trial.number))
    assert float(best_row["best_val_acc"]) == pytest.approx(study.best_value, rel=1e-9)
    assert float(best_row["seconds"]) > 0
    assert "| job | overrides | model |" in report and report.count(" | lenet5 | ") == 3  # sweep table: a row a trial
    assert (sweep / "trial_history.png").read_bytes()[:4] == b"\x89PNG"
    assert len((sweep / "study.csv").read_text().strip().splitlines()) == 4

    study.ask()  # a trial an interruption left RUNNING: it must not count as done
    again = run_tool("transfer.run", *args, "hydra.sweeper.n_trials=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 4 trials already complete" in again.stdout
    continued = _study(sweep).trials
    states = [t.state.name for t in continued]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1 and "RUNNING" not in states
    assert continued[-1].params not in [t.params for t in trials]  # the sampler did not start over
    assert len(list(sweep.glob("trial*/summary.json"))) == 4  # the new trial got a directory of its own
    assert "(5 trials" in (sweep / "report.md").read_text()


def test_report_can_be_rebuilt_from_the_sweep_directory(tmp_path: Path):
    from transfer.core.errors import ConfigError
    from transfer.experiments.hparams_search import rebuild

    with pytest.raises(
        ConfigError, match=r"holds no multirun\.yaml\. Usage: python -m transfer\.hparams_search sweep="
    ):
        rebuild(tmp_path)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(
        {
            "hydra": {
                "sweeper": {
                    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "storage": "sqlite:///${hydra.sweep.dir}/optuna.db",
                    "study_name": "s",
                    "n_trials": 2,
                }
            }
        },
        sweep / "multirun.yaml",
    )
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{sweep / 'optuna.db'}", direction="maximize")
    for value in (0.2, 0.5):
        trial = study.ask()
        trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
        study.tell(trial, value)
    report = rebuild(sweep).read_text()
    assert "Best trial 1: best val accuracy 50.00%" in report and (sweep / "trial_history.png").is_file()
