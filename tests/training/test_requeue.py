"""SLURM's requeue signal is noted in its handler and acted on at the next batch boundary.

Lightning's own handler saved the checkpoint and flushed the loggers inside the handler, and deadlocked when the
signal landed while TensorBoard's writer held its lock. The end-to-end run with a real SIGUSR1 from outside is in
``test_multinode.py`` (``-m slow``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.helpers import TINY, TINY_CNN, fake_slurm
from tests.in_process import run_tool
from transfer.training.requeue import hpc_checkpoint_path


class SignalInside(L.Callback):
    """Send SIGUSR1 the first time Lightning calls ``hook`` and record what the handler did before returning (with
    ``send=False`` only record which handler the signal has)."""

    def __init__(self, hook: str, run_dir: Path, calls: Path, send: bool) -> None:
        self.run_dir, self.calls, self.send = run_dir, calls, send
        self.right_after: tuple[bool, list[str]] | None = None
        self.handler: Any = None
        setattr(self, hook, self._signal)

    def _signal(self, trainer: L.Trainer, *args: Any) -> None:
        if self.right_after is None:
            self.handler = signal.getsignal(signal.SIGUSR1)
            if not self.send:
                self.right_after = (False, [])
                return
            os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler before the next line
            self.right_after = (self.calls.exists(), sorted(p.name for p in self.run_dir.rglob("hpc_ckpt_*")))


def run_signalled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: Path, slurm: bool, send: bool, hook: str
) -> tuple[Any, SignalInside, Path, Path]:
    import transfer.training.train as T

    env, calls = fake_slurm(tmp_path)
    if not slurm:
        env = {"PATH": env["PATH"]}
    run_dir = tmp_path / "run"
    probe = SignalInside(hook, run_dir, calls, send)
    configured = T._configured_callbacks
    monkeypatch.setattr(T, "_configured_callbacks", lambda cfg: [*configured(cfg), probe])
    proc = run_tool(
        "transfer.run",
        *TINY_CNN,
        *TINY,
        f"data.root={data}",
        f"hydra.run.dir={run_dir}",
        env=env,
    )
    return proc, probe, run_dir, calls


def test_the_requeue_waits_for_the_batch_boundary_then_saves_and_requeues(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    previous = signal.getsignal(signal.SIGUSR1)
    proc, probe, run_dir, calls = run_signalled(
        monkeypatch, tmp_path, tiny_cifar, slurm=True, send=True, hook="on_before_optimizer_step"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe.right_after == (False, [])  # the handler only noted the signal: no save, no scontrol inside it
    saved = list(run_dir.rglob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in saved] == ["hpc_ckpt_1.ckpt"] and saved[0].parent == run_dir
    assert torch.load(saved[0], weights_only=True)["global_step"] == 1  # the signalled step finished first
    assert calls.read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) == previous  # the run gives the signal back


def test_the_requeue_signal_during_the_test_is_taken_and_left(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    proc, probe, run_dir, calls = run_signalled(
        monkeypatch, tmp_path, tiny_cifar, slurm=True, send=True, hook="on_test_batch_start"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe.right_after == (False, [])  # Lightning's handler would have saved and requeued here
    assert not calls.exists() and not list(run_dir.rglob("hpc_ckpt_*.ckpt"))
    assert (run_dir / "summary.json").is_file()  # training had finished; the test ran to its end


def test_outside_slurm_the_signal_is_left_alone(
    tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    previous = signal.getsignal(signal.SIGUSR1)
    proc, probe, _, _ = run_signalled(
        monkeypatch, tmp_path, tiny_cifar, slurm=False, send=False, hook="on_before_optimizer_step"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe.handler == previous  # during the fit: neither SlurmRequeue nor Lightning took it


def test_hpc_checkpoints_are_numbered_past_the_highest(tmp_path: Path):
    assert hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"):
        (tmp_path / name).touch()
    assert hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_11.ckpt"
