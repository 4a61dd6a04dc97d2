"""Stops in every phase: a real SIGTERM/SIGINT sent to this process from inside a run (a callback or a patched
function) stops it with one line, exit status 128 + the signal, and whatever had finished written."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.helpers import TINY, TINY_CNN
from tests.in_process import run_tool
from transfer.core.exit_status import Stopped, stop_on_signals

TINY_MODEL = [*TINY_CNN, *TINY]


def flat(text: str) -> str:
    return " ".join(text.split())


def stop_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("stopped by ")]


class SignalAt(L.Callback):
    """Send ``signum`` to this process the first time(s) Lightning calls ``hook`` (``times`` signals)."""

    def __init__(self, hook: str, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.hook, self.signum, self.times, self.sent = hook, signum, times, 0

        def send(*args: Any, **kwargs: Any) -> None:
            trainer = args[0]
            if self.sent == 0 and not trainer.sanity_checking:
                for _ in range(self.times):
                    self.sent += 1
                    os.kill(os.getpid(), self.signum)

        setattr(self, hook, send)


def run_with(monkeypatch: pytest.MonkeyPatch, callback: L.Callback | None, *args: str):
    import transfer.training.train as T

    configured = T._configured_callbacks
    if callback is not None:
        monkeypatch.setattr(T, "_configured_callbacks", lambda cfg: [*configured(cfg), callback])
    return run_tool("transfer.run", *TINY_MODEL, *args)


def files(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("hook", ["on_test_start", "on_test_batch_start"])
def test_sigterm_while_testing_writes_the_trained_runs_outputs_untested(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook: str
):
    proc = run_with(monkeypatch, SignalAt(hook), f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 143, proc.stderr[-3000:]
    lines = stop_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM while testing"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tested"] is False and summary["test_acc"] is None and summary["epochs_run"] == 2
    assert (tmp_path / "run" / "history.json").is_file() and (tmp_path / "run" / "curves_per_epoch.png").is_file()
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / "interrupted.ckpt").exists()  # training had finished: nothing to resume
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1


class LiveThenSignal(SignalAt):
    """:class:`SignalAt`, keeping the model's weights as the last training step left them."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.live = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_sigint_during_validation_saves_a_resumable_checkpoint(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    callback = LiveThenSignal("on_validation_batch_start", signal.SIGINT)
    ema = "+callbacks.ema._target_=transfer.training.ema.EMA"  # TINY_CNN leaves it out
    proc = run_with(monkeypatch, callback, ema, f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 130, proc.stderr[-3000:]
    saved = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    lines = [line for line in proc.stderr.splitlines() if "Resume with:" in line]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT") and f"resume={saved}" in lines[0]
    checkpoint = torch.load(saved, weights_only=True)
    assert checkpoint["global_step"] == 3  # epoch 0 trained, stopped validating it
    # The validation had swapped the EMA into the model: the checkpoint still keeps the trained weights as the live
    # ones (what a resume trains on) and the average as state_dict.
    live = checkpoint["current_model_state"]
    assert all(torch.equal(live[k], v) for k, v in callback.live.items())
    assert not all(torch.equal(checkpoint["state_dict"][k], v) for k, v in callback.live.items())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_signal_inside_a_training_step_waits_for_the_batch_boundary(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    proc = run_with(
        monkeypatch, SignalAt("on_before_optimizer_step"), f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "r" / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert saved["global_step"] == 1  # the step the signal arrived in was finished, not cut in half
    assert len(stop_lines(proc.stderr)) == 1


def test_sigterm_while_caching_features_stops_with_one_line(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from transfer.training.features import FeatureCache

    compute = FeatureCache._compute

    def interrupted(self, *args: Any, **kwargs: Any):
        os.kill(os.getpid(), signal.SIGTERM)
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "_compute", interrupted)
    run_dir = tmp_path / "run"
    proc = run_with(
        monkeypatch, None, f"data.root={tiny_cifar}", f"hydra.run.dir={run_dir}", "finetune.cache_features=true"
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    lines = stop_lines(proc.stderr)
    assert len(lines) == 1 and "before the first training step" in lines[0], proc.stderr[-2000:]
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints" / "interrupted.ckpt").exists()


def test_a_second_signal_while_writing_outputs_is_not_swallowed(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import transfer.training.train as T

    figures = T._figures

    def slow_figures(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal: the first stopped the test phase
        figures(*args, **kwargs)

    monkeypatch.setattr(T, "_figures", slow_figures)
    run_dir = tmp_path / "run"
    proc = run_with(monkeypatch, SignalAt("on_test_start"), f"data.root={tiny_cifar}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 143, proc.stderr[-3000:]
    lines = stop_lines(proc.stderr)
    assert len(lines) == 1 and "while writing the outputs" in lines[0], proc.stderr[-2000:]
    assert (run_dir / "summary.json").is_file() and not (run_dir / "curves_per_epoch.png").exists()


def test_stop_on_signals_raises_at_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as info, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes of the main thread
            pass
    assert info.value.status == 143 and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_predict_is_one_line_143_and_writes_nothing(
    tmp_path: Path, tiny_cifar: Path, monkeypatch: pytest.MonkeyPatch
):
    import transfer.deploy.predict as P
    from tests.deploy.test_export import make_run

    ckpt = make_run(tmp_path / "run")
    decode = P._decode

    def interrupted(*args: Any, **kwargs: Any):
        os.kill(os.getpid(), signal.SIGTERM)
        return decode(*args, **kwargs)

    monkeypatch.setattr(P, "_decode", interrupted)
    out = tmp_path / "predictions"
    proc = run_tool("transfer.predict", f"ckpt={ckpt}", f"images={tiny_cifar / 'test'}", f"out={out}")
    assert proc.returncode == 143, proc.stderr[-2000:]
    lines = stop_lines(proc.stderr)
    assert len(lines) == 1 and "after 0 of 12 images; no results were written" in lines[0], proc.stderr[-2000:]
    assert not out.exists()


def test_sigint_during_export_removes_the_unchecked_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import transfer.deploy.export as ex
    from tests.deploy.test_export import make_run

    ckpt = make_run(tmp_path / "run")
    before = files(tmp_path / "run")

    def interrupted(*args: Any, **kwargs: Any):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ex, "check_parity", interrupted)
    proc = run_tool("transfer.export", f"ckpt={ckpt}", "format=torchscript")
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = stop_lines(proc.stderr)
    assert len(lines) == 1 and "was not written" in lines[0], proc.stderr[-2000:]
    assert files(tmp_path / "run") == before  # the export folder holds nothing, the run is untouched


@pytest.mark.parametrize("hook", ["on_validation_start", "on_train_epoch_end"])
def test_a_stop_at_an_epochs_end_resumes_with_every_epoch_in_the_history(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook: str
):
    """A signal while an epoch ends stops the run during its validation (run again on resume) or after its end
    (history row, checkpoints): never halfway through the end, which a resume would skip."""
    run_dir = tmp_path / "run"
    proc = run_with(monkeypatch, SignalAt(hook, signal.SIGINT), f"data.root={tiny_cifar}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 130, proc.stderr[-3000:]
    saved = run_dir / "checkpoints" / "interrupted.ckpt"
    epoch = torch.load(saved, weights_only=True)["epoch"]
    monkeypatch.undo()
    resumed = run_tool(
        "transfer.run",
        *TINY_MODEL,
        f"data.root={tiny_cifar}",
        f"resume={saved}",
        f"hydra.run.dir={tmp_path / 'resumed'}",
        f"trainer.max_epochs={epoch + 2}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = json.loads((tmp_path / "resumed" / "history.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == list(range(1, epoch + 3))
