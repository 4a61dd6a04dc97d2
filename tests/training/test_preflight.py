"""Fast answers, no debris: a run's inputs are checked before anything is built, and a refused run leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, TINY_CNN, make_image_folder
from tests.in_process import run_tool

TINY_MODEL = [*TINY_CNN, *TINY]


@pytest.fixture
def never_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the data and the model fails the test: a refusal must come before it."""
    import transfer.training.train as T

    def fail(*args, **kwargs):
        raise AssertionError("the model and the data were built")

    monkeypatch.setattr(T, "build", fail)


def test_a_missing_data_root_is_refused_before_the_model_is_built_and_leaves_no_run_directory(
    tiny_models, never_build, tmp_path: Path
):
    outputs = tmp_path / "outputs"
    args = ["data=imagefolder", f"data.root={tmp_path / 'absent'}", f"hydra.run.dir={outputs / 'runs' / 'day' / 'x'}"]
    proc = run_tool("transfer.run", *[a for a in TINY_MODEL if a != "data.download=false"], *args)
    assert proc.returncode == 2 and "No image folder at" in proc.stderr and "Traceback" not in proc.stderr
    assert not outputs.exists()
    cifar = run_tool("transfer.run", *TINY_MODEL, f"data.root={tmp_path / 'none'}", f"hydra.run.dir={outputs / 'r'}")
    assert cifar.returncode == 2 and "CIFAR-10 was not found" in cifar.stderr and not outputs.exists()


def test_unavailable_weights_are_refused_before_the_model_is_built_and_leave_no_run_directory(
    never_build, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache; downloads fail in tests
    outputs = tmp_path / "outputs"
    args = ["model=resnet18", f"data.root={tiny_cifar}", f"hydra.run.dir={outputs / 'run'}", *TINY]
    proc = run_tool("transfer.run", *args)
    assert proc.returncode == 2 and "could not be downloaded" in proc.stderr and "Traceback" not in proc.stderr
    assert not outputs.exists()
    missing = run_tool("transfer.run", *args[: -len(TINY)], "model.weights=/no/such/file.pth", *TINY)
    assert missing.returncode == 2 and "model.weights=/no/such/file.pth does not exist" in missing.stderr
    assert not outputs.exists()


def test_a_run_refused_after_hydra_wrote_its_directory_leaves_nothing_but_what_was_there(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import transfer.training.train as T
    from transfer.core.errors import ConfigError

    def refuse(*args, **kwargs):
        raise ConfigError("refused while building")

    monkeypatch.setattr(T, "build", refuse)
    (tmp_path / "outputs").mkdir()  # existed before the run: stays
    proc = run_tool("transfer.run", *TINY_MODEL, f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'outputs/a/b'}")
    assert proc.returncode == 2 and "refused while building" in proc.stderr
    assert list((tmp_path / "outputs").iterdir()) == []


def test_a_refused_run_directory_holding_more_than_hydras_files_is_kept_with_its_failure(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import transfer.training.train as T
    from transfer.core.errors import ConfigError

    def refuse(*args, **kwargs):  # after train() wrote config.yaml into the run directory
        raise ConfigError("refused by the trainer")

    monkeypatch.setattr(T, "build_trainer", refuse)
    proc = run_tool("transfer.run", *TINY_MODEL, f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "refused by the trainer" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["reason"] == "refused by the trainer"


def test_a_refused_job_inside_a_sweep_still_writes_its_failed_json(tiny_models, tiny_cifar: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    roots = f"data.root={tiny_cifar},{tmp_path / 'absent'}"
    proc = run_tool("transfer.run", "-m", *TINY_MODEL, "trainer.max_epochs=1", roots, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (sweep / "0" / "summary.json").is_file()
    record = json.loads((sweep / "1" / "failed.json").read_text())
    assert record["reason"].startswith("CIFAR-10 was not found") and record["error"] == "DataNotFoundError"


def test_an_image_folder_with_one_class_is_refused_by_its_layout(tmp_path: Path):
    from omegaconf import OmegaConf

    from transfer.core.errors import ConfigError
    from transfer.training.inputs import check_data

    root = make_image_folder(tmp_path / "photos", {"train": 2}, classes=("cat",))
    node = OmegaConf.create({"_target_": "transfer.data.ImageFolderData", "root": str(root)})
    with pytest.raises(ConfigError, match="class folder"):
        check_data(node)
    node.root = str(make_image_folder(tmp_path / "two", {"train": 2}))
    check_data(node)  # a usable layout: nothing is decoded, nothing raised


def test_keep_0_in_a_sweep_keeps_only_the_best_jobs_best_checkpoint(tmp_path: Path):
    from transfer.experiments.sweep import keep_sweep_best

    for job, score in (("0", 0.5), ("1", 0.8), ("2", 0.8), ("3", None)):
        ckpts = tmp_path / job / "checkpoints"
        ckpts.mkdir(parents=True)
        (ckpts / "best-epoch01.ckpt").write_bytes(b"w")
        (ckpts / "last.ckpt").write_bytes(b"w")
        best = str(ckpts / "best-epoch01.ckpt")
        (tmp_path / job / "summary.json").write_text(json.dumps({"best_val_acc": score, "best_checkpoint": best}))
    (tmp_path / "4" / "checkpoints").mkdir(parents=True)  # still running: no summary, untouched
    (tmp_path / "4" / "checkpoints" / "best-epoch01.ckpt").write_bytes(b"w")

    assert keep_sweep_best(tmp_path) == tmp_path / "1"  # the earlier of two equal scores
    kept = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/checkpoints/best*.ckpt"))
    assert kept == ["1/checkpoints/best-epoch01.ckpt", "4/checkpoints/best-epoch01.ckpt"]
    assert all((tmp_path / job / "checkpoints" / "last.ckpt").is_file() for job in "0123")
    assert json.loads((tmp_path / "0" / "summary.json").read_text())["best_checkpoint"] is None
    assert json.loads((tmp_path / "1" / "summary.json").read_text())["best_checkpoint"].endswith("best-epoch01.ckpt")


@pytest.mark.parametrize(
    "override, said",
    [
        ("data._target_=transfer.data.NoSuchData", "data._target_='transfer.data.NoSuchData' must name a data module"),
        ("data._target_=nowhere.Data", "data._target_='nowhere.Data' must name a data module"),
        ("+trainer.sync_batchnorm=true", "trainer.sync_batchnorm=true needs GPUs"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_before_anything_is_built(
    never_build, tiny_cifar: Path, tmp_path: Path, override: str, said: str
):
    proc = run_tool(
        "transfer.run", *TINY_MODEL, f"data.root={tiny_cifar}", override, f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert proc.returncode == 2 and said in " ".join(proc.stderr.split()), proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_train_on_val_is_refused_beside_what_reads_the_validation_split(compose_cfg):
    from omegaconf import OmegaConf

    from transfer.training.preflight import problems

    assert problems(compose_cfg("data.train_on_val=true")) == []
    for override, reader in (
        ("scheduler=plateau", "scheduler.monitor=val/loss"),
        ("finetune.cache_features=true", "finetune.cache_features=true"),
    ):
        found = problems(compose_cfg("data.train_on_val=true", override))
        assert len(found) == 1 and "nothing is left to validate on" in found[0] and reader in found[0]
        assert problems(compose_cfg(override)) == []
    search = compose_cfg("data.train_on_val=true")
    OmegaConf.update(
        search, "hydra.sweeper._target_", "hydra_plugins.hydra_optuna_sweeper.OptunaSweeper", force_add=True
    )
    assert any("Optuna search" in p for p in problems(search))
    assert any("data.train_on_val='yes'" in p for p in problems(compose_cfg("data.train_on_val=yes")))


def test_keep_0_in_a_sweep_with_nothing_scored_removes_nothing(tmp_path: Path):
    from transfer.experiments.sweep import keep_sweep_best

    for job in ("0", "1"):  # data.train_on_val jobs: no validation score to compare
        ckpts = tmp_path / job / "checkpoints"
        ckpts.mkdir(parents=True)
        (ckpts / "best-epoch02.ckpt").write_bytes(b"w")
        best = str(ckpts / "best-epoch02.ckpt")
        (tmp_path / job / "summary.json").write_text(json.dumps({"best_val_acc": None, "best_checkpoint": best}))
    assert keep_sweep_best(tmp_path) is None
    assert all((tmp_path / job / "checkpoints" / "best-epoch02.ckpt").is_file() for job in "01")
