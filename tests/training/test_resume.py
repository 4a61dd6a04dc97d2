"""Exact resume: a run killed at any step and resumed from its last.ckpt ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import TINY

EPOCHS = 4  # 30 training images in batches of 8: 3 steps per epoch; the backbone unfreezes at epoch 1


class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the run's own gets to run after it."""


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed


@pytest.fixture
def tiny_cfg(tiny_models, compose_cfg, tiny_cifar: Path):
    def make(*extra: str, scheduler: str = "plateau"):
        return compose_cfg(
            "model=resnet18",
            "model.name=tiny_test_cnn",
            "model.pretrained=false",
            "~callbacks.ema",
            "optimizer=adam",
            f"scheduler={scheduler}",
            *(["scheduler.patience=0"] if scheduler == "plateau" else []),
            f"data.root={tiny_cifar}",
            *[a for a in TINY if not a.startswith("trainer.max_epochs")],
            f"trainer.max_epochs={EPOCHS}",
            "trainer.deterministic=true",
            *extra,
        )

    return make


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# step 4: in the unfreeze epoch (resumes from epoch 0, the backbone's groups still frozen at lr 0);
# step 7: just after the unfreeze epoch (resumes with the backbone training and its optimizer state restored).
@pytest.mark.parametrize("kill_step", [4, 7])
def test_kill_and_resume_equals_the_uninterrupted_run(
    tiny_cfg, tmp_path: Path, kill_step: int, monkeypatch: pytest.MonkeyPatch
):
    import transfer.training.train as T

    whole = T.train(tiny_cfg(), tmp_path / "whole")
    configured = T._configured_callbacks
    monkeypatch.setattr(T, "_configured_callbacks", lambda cfg: [*configured(cfg), KillAt(kill_step)])
    with pytest.raises(Killed):
        T.train(tiny_cfg(), tmp_path / "killed")
    monkeypatch.setattr(T, "_configured_callbacks", configured)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == kill_step // 3 - 1  # the last epoch that finished before the kill
    original = {p: p.read_bytes() for p in (tmp_path / "killed").rglob("*") if p.is_file()}
    resumed = T.train(tiny_cfg(f"resume={last}"), tmp_path / "resumed")
    assert {p: p.read_bytes() for p in (tmp_path / "killed").rglob("*") if p.is_file()} == original

    a, b = (load(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("whole", "resumed"))
    assert a["epoch"] == b["epoch"] == EPOCHS - 1 and a["global_step"] == b["global_step"] == 3 * EPOCHS
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["lr_schedulers"] == b["lr_schedulers"]  # the plateau scheduler saw every epoch's val/loss
    groups = [
        [(g["name"], len(g["params"]), g["lr"]) for g in c["optimizer_states"][0]["param_groups"]] for c in (a, b)
    ]
    assert groups[0] == groups[1]  # one layout, built the same way by every run
    assert [name for name, _, _ in groups[0]] == ["head", "head.no_decay", "backbone", "backbone.no_decay"]
    history = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("whole", "resumed")]
    epochs = [[r["epoch"] for r in h["epochs"]] for h in history]
    assert len(epochs[1]) == EPOCHS and epochs[1] == epochs[0]  # the figures cover the whole run
    assert history[0]["epochs"] == history[1]["epochs"] and len(history[1]["step_loss"]) == 3 * EPOCHS
    for key in ("epochs_run", "best_epoch", "best_val_acc", "test_acc"):
        assert whole[key] == resumed[key], key
    assert Path(resumed["best_checkpoint"]).parent == tmp_path / "resumed" / "checkpoints"
    steps = tensorboard_val_steps(tmp_path / "whole")
    assert len(steps) == EPOCHS and tensorboard_val_steps(tmp_path / "resumed") == steps  # one run, all epochs


def tensorboard_val_steps(run_dir: Path) -> set[int]:
    """The steps at which the run's TensorBoard directory shows a validation accuracy (one per epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: set[int] = set()
    for events in (run_dir / "tensorboard").glob("*tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "val/acc" in acc.Tags()["scalars"]:
            steps |= {int(e.step) for e in acc.Scalars("val/acc")}
    return steps


def test_last_ckpt_follows_every_epoch_not_only_new_bests(tiny_cfg, tmp_path: Path):
    import transfer.training.train as T

    summary = T.train(tiny_cfg("optimizer.lr=1e-9"), tmp_path / "run")  # accuracy never improves after epoch 0
    first = json.loads((tmp_path / "run" / "history.json").read_text())["epochs"][0]["epoch"]
    assert summary["best_epoch"] == first
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["epoch"] == EPOCHS - 1
    assert Path(summary["last_checkpoint"]).name == "last.ckpt"


@pytest.mark.slow  # three child processes; test_kill_and_resume_equals_the_uninterrupted_run is its fast twin
def test_sigkill_at_an_arbitrary_step_then_resume_equals_the_uninterrupted_run(tiny_cifar: Path, tmp_path: Path):
    """A real ``kill -9`` of ``python -m transfer.run`` (it may land mid-write: checkpoints are atomic)."""
    import os
    import signal
    import subprocess
    import time

    from tests.test_resilience import ROOT, tiny_command, tiny_env

    args = [
        f"data.root={tiny_cifar}",
        "optimizer=adam",
        "scheduler=plateau",
        "trainer.max_epochs=6",
        "trainer.deterministic=true",
    ]
    whole = subprocess.run(
        tiny_command(*args, f"hydra.run.dir={tmp_path / 'whole'}"),
        capture_output=True,
        text=True,
        env=tiny_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(
        tiny_command(*args, f"hydra.run.dir={tmp_path / 'killed'}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=tiny_env(),
        cwd=ROOT,
    )
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert load(last)["epoch"] < 5  # killed before the end
    command = tiny_command(*args, f"resume={tmp_path / 'killed'}", f"hydra.run.dir={tmp_path / 'resumed'}")
    resumed = subprocess.run(command, capture_output=True, text=True, env=tiny_env(), cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (load(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("whole", "resumed"))
    assert a["global_step"] == b["global_step"] == 18
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "resumed")]
    assert summaries[0]["epochs_run"] == summaries[1]["epochs_run"] == 6
    assert summaries[0]["test_acc"] == summaries[1]["test_acc"]


def test_mid_epoch_checkpoints_every_n_steps_resume_at_that_step(tiny_cfg, tmp_path: Path):
    import transfer.training.train as T

    T.train(tiny_cfg("callbacks.mid_epoch_checkpoint.every_n_steps=2"), tmp_path / "run")
    mid = load(tmp_path / "run" / "checkpoints" / "mid-epoch.ckpt")
    # steps 2, 4, 8, 10 are inside an epoch (3 steps each); 6 and 12 end one and are left to last.ckpt
    assert mid["global_step"] == 10 and mid["epoch"] == 3
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 12
    resumed = T.train(tiny_cfg(f"resume={tmp_path / 'run' / 'checkpoints' / 'mid-epoch.ckpt'}"), tmp_path / "again")
    assert load(tmp_path / "again" / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert resumed["epochs_run"] == EPOCHS
    # Lightning skips on_train_epoch_start in the epoch it resumes inside, so the lr monitor logs nothing for it;
    # the history row still has both groups' rates.
    rows = json.loads((tmp_path / "again" / "history.json").read_text())["epochs"]
    assert len(rows) == EPOCHS and {"lr/head", "lr/backbone"} <= rows[3].keys()


class StopAt(L.Callback):
    """A SIGTERM's stop at step ``step`` (what GracefulStop sees after a real one): interrupted.ckpt is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            from transfer.core.exit_status import Stopped

            raise Stopped(15)


def same_weights(a: Path, b: Path) -> tuple[int, float]:
    """(how many tensors differ, the largest absolute difference) between two checkpoints' weights."""
    x, y = load(a)["state_dict"], load(b)["state_dict"]
    assert x.keys() == y.keys()
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    return len(differ), max((float((x[k].double() - y[k].double()).abs().max()) for k in differ), default=0.0)


# 4: inside the unfreeze epoch (epoch 1, after its first step); 8: inside epoch 2, the backbone training.
@pytest.mark.parametrize("stop_step", [4, 8])
@pytest.mark.parametrize("kind", ["mid-epoch", "interrupted"])
def test_resume_inside_an_epoch_ends_with_the_uninterrupted_runs_weights(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, stop_step: int
):
    import transfer.training.train as T
    from transfer.core.exit_status import Stopped

    extra = ["callbacks.mid_epoch_checkpoint.every_n_steps=1", "mix.mixup_alpha=0.4"]  # MixUp draws too
    T.train(tiny_cfg(*extra), tmp_path / "whole")
    configured = T._configured_callbacks
    stopper = KillAt(stop_step) if kind == "mid-epoch" else StopAt(stop_step)
    monkeypatch.setattr(T, "_configured_callbacks", lambda cfg: [*configured(cfg), stopper])
    with pytest.raises(Killed if kind == "mid-epoch" else Stopped):
        T.train(tiny_cfg(*extra), tmp_path / "stopped")
    monkeypatch.setattr(T, "_configured_callbacks", configured)
    saved = tmp_path / "stopped" / "checkpoints" / f"{kind}.ckpt"
    assert load(saved)["global_step"] == stop_step and stop_step % 3 != 0  # inside an epoch
    original = {p: p.read_bytes() for p in (tmp_path / "stopped").rglob("*") if p.is_file()}
    T.train(tiny_cfg(*extra, f"resume={saved}"), tmp_path / "resumed")
    assert {p: p.read_bytes() for p in (tmp_path / "stopped").rglob("*") if p.is_file()} == original
    a, b = (tmp_path / d / "checkpoints" / "last.ckpt" for d in ("whole", "resumed"))
    assert load(b)["global_step"] == 3 * EPOCHS
    assert same_weights(a, b) == (0, 0.0)


def test_resume_with_more_epochs_replans_the_one_cycle_schedule(
    tiny_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import transfer.training.train as T

    T.train(tiny_cfg("trainer.max_epochs=2", scheduler="onecycle"), tmp_path / "short")
    last = tmp_path / "short" / "checkpoints" / "last.ckpt"
    assert load(last)["lr_schedulers"][0]["total_steps"] == 6
    with caplog.at_level("INFO"):
        summary = T.train(
            tiny_cfg("trainer.max_epochs=4", "optimizer.lr=0.5", f"resume={last}", scheduler="onecycle"),
            tmp_path / "longer",
        )
    assert summary["epochs_run"] == 4
    end = load(tmp_path / "longer" / "checkpoints" / "last.ckpt")
    assert end["global_step"] == 12 and end["lr_schedulers"][0]["total_steps"] == 12
    assert end["lr_schedulers"][0]["last_epoch"] == 12  # continued from step 6 to the new end
    head = next(g for g in end["optimizer_states"][0]["param_groups"] if g["name"] == "head")
    assert head["max_lr"] == pytest.approx(0.5)  # optimizer.lr=0.5 took effect (max_lr: ${optimizer.lr})
    assert "the lr schedule was re-planned" in caplog.text and "continues from step 6 of 12" in caplog.text


@pytest.mark.parametrize(
    "override, named",
    [
        ({"scheduler": "cosine"}, "scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR"),
        ({"optimizer": "sgd"}, "optimizer._target_=torch.optim.SGD"),
    ],
)
def test_resume_refuses_another_optimizer_or_scheduler_class(tiny_cfg, tmp_path: Path, override: dict, named: str):
    import transfer.training.train as T
    from transfer.core.errors import ConfigError
    from transfer.run import prepare

    T.train(tiny_cfg("trainer.max_epochs=1"), tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()}
    with pytest.raises(ConfigError) as info:
        resume = f"resume={tmp_path / 'run'}"
        prepare(
            tiny_cfg(
                resume,
                *[f"optimizer={v}" for v in override.values() if "optimizer" in override],
                **{k: v for k, v in override.items() if k == "scheduler"},
            )
        )
    text = str(info.value)
    assert f"this run sets {named}" in text and "\n" not in text and "model.weights=" in text
    assert {p: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()} == before


def test_resume_changes_are_listed_and_the_checkpoints_settings_named(tiny_cfg, tmp_path: Path, caplog):
    import transfer.training.train as T
    from transfer.run import prepare

    T.train(tiny_cfg("trainer.max_epochs=1"), tmp_path / "run")
    cfg = tiny_cfg("optimizer.lr=0.5", f"resume={tmp_path / 'run'}")
    with caplog.at_level("INFO"):
        prepare(cfg)
    assert cfg.resume == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert "optimizer.lr: 0.001 -> 0.5" in caplog.text and "trainer.max_epochs: 1 -> 4" in caplog.text
    assert "from the checkpoint: the weights, the optimizer state" in caplog.text


def test_resume_of_a_directory_takes_its_newest_checkpoint(tmp_path: Path):
    import os

    from transfer.training.preflight import resume_path

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "mid-epoch.ckpt").write_bytes(b"x")
    assert resume_path(tmp_path) == ckpts / "mid-epoch.ckpt"  # no last.ckpt: still resumable
    now = (ckpts / "mid-epoch.ckpt").stat().st_mtime_ns
    for later, name in ((2, "interrupted.ckpt"), (1, "last.ckpt")):  # a stop inside the epoch after last.ckpt
        (ckpts / name).write_bytes(b"x")
        os.utime(ckpts / name, ns=(now + later * 10**9, now + later * 10**9))
    assert resume_path(tmp_path) == ckpts / "interrupted.ckpt"
