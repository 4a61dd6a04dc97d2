"""Checkpoints sized to their use: the best holds the weights, last.ckpt what a resume needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TINY
from tests.in_process import run_tool
from transfer.core.errors import ConfigError


@pytest.fixture
def tiny_cfg(compose_cfg, tiny_cifar: Path):
    """The config of tiny_test_cnn (with the default EMA) on the tiny CIFAR folder, 2 epochs, plus overrides."""

    def make(*extra: str):
        return compose_cfg(
            "model=resnet18", "model.name=tiny_test_cnn", "model.pretrained=false", f"data.root={tiny_cifar}",
            *TINY, *extra,
        )  # fmt: skip

    return make


@pytest.fixture
def tiny_run(tiny_models, tiny_cfg, tmp_path: Path):
    """Train :func:`tiny_cfg` into tmp_path/run; returns its summary."""
    from transfer.training.train import train

    return lambda *extra: train(tiny_cfg(*extra), tmp_path / "run")


def load(path: Path | str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_best_checkpoint_holds_the_weights_and_last_ckpt_the_training_state(tiny_run, tmp_path: Path):
    from transfer.deploy.load import find_checkpoint
    from transfer.training.module import Classifier
    from transfer.training.preflight import check_checkpoint

    summary = tiny_run()
    folder = tmp_path / "run" / "checkpoints"
    best_files = sorted(folder.glob("best-epoch*.ckpt"))
    assert len(best_files) == 1 and summary["best_checkpoint"] == str(best_files[0])
    best, last = load(best_files[0]), load(folder / "last.ckpt")
    assert best_files[0].name == f"best-epoch{best['epoch'] + 1:02d}.ckpt"  # named by the 1-based epoch
    assert {"state_dict", "current_model_state", "hyper_parameters", "transfer"} <= set(best)  # EMA and live
    assert not {"optimizer_states", "lr_schedulers", "loops", "callbacks"} & set(best)
    assert best["selection"]["monitor"] == "val/acc" and best["selection"]["score"] == pytest.approx(
        summary["best_val_acc"]
    )
    assert {"optimizer_states", "loops", "callbacks", "current_model_state"} <= set(last)
    assert best_files[0].stat().st_size < (folder / "last.ckpt").stat().st_size

    assert find_checkpoint(tmp_path / "run") == best_files[0]
    module = Classifier.from_checkpoint(best_files[0])  # what predict, evaluate, export and serve load
    assert module.class_names == ["cat", "dog", "ship"] and module.preprocess is not None
    loaded = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    ema = {k: v for k, v in best["state_dict"].items() if k.startswith("model.")}
    assert all(torch.equal(loaded[k], v) for k, v in ema.items())  # the EMA weights, not the live ones

    with pytest.raises(ConfigError, match=r"holding the weights only") as info:
        check_checkpoint(best_files[0])
    assert f"resume={folder / 'last.ckpt'}" in str(info.value) and "\n" not in str(info.value)
    check_checkpoint(folder / "last.ckpt")  # resumable


def test_save_optimizer_makes_the_best_checkpoint_resumable(tiny_run, tmp_path: Path):
    from transfer.training.preflight import check_checkpoint

    summary = tiny_run("checkpoint.save_optimizer=true")
    best = load(summary["best_checkpoint"])
    assert {"optimizer_states", "loops", "callbacks", "current_model_state"} <= set(best)
    check_checkpoint(Path(summary["best_checkpoint"]))


def test_keep_0_and_keep_last_false_test_the_best_then_remove_every_checkpoint(tiny_run, tmp_path: Path):
    summary = tiny_run("checkpoint.keep=0", "checkpoint.keep_last=false")
    assert summary["test_acc"] is not None and summary["best_val_acc"] is not None  # the best was written and tested
    assert summary["best_checkpoint"] == "" and summary["last_checkpoint"] == ""
    assert list((tmp_path / "run" / "checkpoints").glob("*.ckpt")) == []


def test_a_run_directory_with_several_best_checkpoints_gives_the_best_scored(tmp_path: Path):
    from transfer.deploy.load import find_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, score in (("best-epoch01.ckpt", 0.9), ("best-epoch03.ckpt", 0.7)):  # the newer one scored lower
        torch.save({"selection": {"monitor": "val/acc", "mode": "max", "score": score}}, folder / name)
    assert find_checkpoint(tmp_path) == folder / "best-epoch01.ckpt"
    torch.save({"selection": {"monitor": "val/acc", "mode": "max", "score": 0.95}}, folder / "best-epoch04.ckpt")
    assert find_checkpoint(tmp_path) == folder / "best-epoch04.ckpt"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("checkpoint.keep=-1", "checkpoint.keep=-1 must be an integer >= 0"),
        ("checkpoint.keep_last=maybe", "checkpoint.keep_last='maybe' must be true or false"),
        ("checkpoint.save_optimizer=1", "checkpoint.save_optimizer=1 must be true or false"),
    ],
)
def test_checkpoint_settings_are_validated(compose_cfg, override: str, expected: str):
    from transfer.training.preflight import problems

    found = problems(compose_cfg(override))
    assert len(found) == 1 and found[0].startswith(expected), found


def _fit_scripted(tmp_path: Path, scores: list[float], select_final: bool):
    """Fit a toy module whose validations score ``scores`` in turn; returns the checkpoint and the history."""
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from transfer.training.history import History
    from transfer.training.train import best_and_last_checkpoint

    class Toy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val/acc", scores[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1])), batch_size=2)
    checkpoint, history = best_and_last_checkpoint(tmp_path, select_final=select_final), History()
    trainer = L.Trainer(
        max_epochs=len(scores),
        callbacks=[checkpoint, history],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Toy(), train_dataloaders=data, val_dataloaders=data)
    return checkpoint, history


@pytest.mark.parametrize(("select_final", "kept", "val_acc"), [(False, 1, 0.9), (True, 3, 0.7)])
def test_a_budget_keeps_and_reports_the_final_checkpoint_not_the_best_scored(tmp_path, select_final, kept, val_acc):
    from transfer.training.train import _selected

    checkpoint, history = _fit_scripted(tmp_path, [0.9, 0.5, 0.7], select_final)
    assert Path(checkpoint.best_model_path).name == f"best-epoch{kept:02d}.ckpt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt")) == [f"best-epoch{kept:02d}.ckpt"]
    assert _selected(history, checkpoint) == (pytest.approx(val_acc), kept)


def test_train_on_val_trains_on_every_image_and_tests_the_final_weights(
    tiny_run, tiny_cfg, tiny_cifar: Path, tmp_path: Path
):
    import json

    from transfer.run import describe

    summary = tiny_run("data.train_on_val=true")
    data = summary["data"]
    assert data["train_on_val"] is True and data["train_size"] == 36 and "val_size" not in data  # 30 + the 6
    assert summary["selected_by"] == "final" and summary["best_val_acc"] is None and summary["test_acc"] is not None
    assert summary["best_epoch"] == 2  # the tested checkpoint's epoch: the last
    tested, last = load(summary["best_checkpoint"]), load(summary["last_checkpoint"])
    assert tested["global_step"] == last["global_step"] == 2 * (36 // 8)  # 2 epochs, the final step's weights
    epochs = json.loads((tmp_path / "run" / "history.json").read_text())["epochs"]
    assert len(epochs) == 2 and not any(key.startswith("val/") for row in epochs for key in row)
    assert "(final checkpoint: epoch 2, its validation images trained too)" in describe(summary)
    from transfer.training.preflight import resume_changes

    saved = load(summary["last_checkpoint"])
    with pytest.raises(ConfigError, match=r"data\.train_on_val=true"):  # it would validate on images it trained on
        resume_changes(Path(summary["last_checkpoint"]), saved, tiny_cfg())
    assert resume_changes(Path(summary["last_checkpoint"]), saved, tiny_cfg("data.train_on_val=true")) == []
    scored = run_tool("transfer.evaluate", f"ckpt={tmp_path / 'run'}", "split=val", f"hydra.run.dir={tmp_path / 'ev'}")
    assert scored.returncode == 2 and "no validation split" in scored.stderr and "Traceback" not in scored.stderr
    # The checkpoint alone says so: without the run's config.yaml, and with another data config, it still refuses.
    alone = tmp_path / "alone.ckpt"
    alone.write_bytes(Path(summary["best_checkpoint"]).read_bytes())
    for args in ([], [f"data.root={tiny_cifar}", "data.train_on_val=false"]):
        scored = run_tool("transfer.evaluate", f"ckpt={alone}", "split=val", *args, f"hydra.run.dir={tmp_path / 'e2'}")
        said = " ".join(scored.stderr.split())
        assert scored.returncode == 2 and "trained on its validation images" in said and "Traceback" not in said
