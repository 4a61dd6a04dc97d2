"""Environment faults are one paragraph: a full disk, a read-only folder, a run directory through a file.

Each ends with exit status 2, the path and what to do, the earlier checkpoints intact, and a readable
``failed.json`` (or none, when even that cannot be written). Orphan temporary files of a killed checkpoint write are
removed when the next run or resume starts there.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import TINY, TINY_CNN
from tests.in_process import run_tool
from transfer.core.disk import DiskError
from transfer.training import checkpoint_io
from transfer.training.checkpoint_io import atomic_torch_save, remove_orphans

TINY_MODEL = [*TINY_CNN, *TINY]


class FullDisk(io.BufferedWriter):
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, raw: io.FileIO, room: int) -> None:
        super().__init__(raw)
        self.room = room

    def write(self, data) -> int:  # type: ignore[override]
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, saves: int, room: int = 100) -> None:
    """Checkpoint writes after the first ``saves`` find the disk full (``room`` bytes in)."""
    calls = {"n": 0}
    real = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= saves:
            return real(fd, mode, *args, **kwargs)
        return FullDisk(io.FileIO(fd, "wb"), room)

    monkeypatch.setattr(checkpoint_io.os, "fdopen", fdopen)


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"epoch": 1}, target)
    fill_disk_after(monkeypatch, saves=0)
    with pytest.raises(DiskError) as err:
        atomic_torch_save({"epoch": 2, "w": torch.zeros(1000)}, target)
    message = str(err.value)
    assert str(target) in message and "the disk is full" in message and "Free space there" in message
    assert "previous last.ckpt, if any, is unchanged" in message and "\n" not in message
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_a_full_disk_during_a_run_is_one_paragraph_exit_2(tiny_models, tiny_cifar: Path, tmp_path: Path, monkeypatch):
    run_dir = tmp_path / "run"
    fill_disk_after(monkeypatch, saves=2)  # epoch 0's best and last are written, epoch 1's find the disk full
    proc = run_tool("transfer.run", *TINY_MODEL, f"data.root={tiny_cifar}", f"hydra.run.dir={run_dir}")
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the disk is full" in message and "hydra.run.dir=" in message and str(run_dir / "checkpoints") in message
    failed = json.loads((run_dir / "failed.json").read_text())
    assert (
        failed["error"] == "DiskError" and failed["reason"].startswith("Cannot write") and "pos" not in failed["reason"]
    )
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob(".*.tmp"))
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0  # intact


def test_failed_json_that_cannot_be_written_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transfer.experiments import sweep

    monkeypatch.setattr(sweep.HydraConfig, "get", staticmethod(lambda: OmegaConf.create(
        {"job": {"num": 0}, "overrides": {"task": ["seed=1"]}})))  # fmt: skip

    def full(self: Path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        sweep.record_failure(tmp_path, RuntimeError("x"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(sweep.HydraConfig, "get", staticmethod(lambda: OmegaConf.create(
        {"job": {"num": 0}, "overrides": {"task": ["seed=1"]}})))  # fmt: skip
    sweep.record_failure(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert [p.name for p in tmp_path.iterdir()] == ["failed.json"]


def test_a_run_directory_through_a_file_is_refused_before_anything_is_written(tiny_models, tmp_path: Path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    proc = run_tool("transfer.run", *TINY_MODEL, f"data.root={tmp_path}", f"hydra.run.dir={blocker / 'run'}")
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"runs through {blocker}, which is a file" in message and "Choose another hydra.run.dir=" in message
    assert blocker.read_text() == "keep me"


def test_a_read_only_run_directory_is_refused(tiny_models, tmp_path: Path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        proc = run_tool("transfer.run", *TINY_MODEL, f"data.root={tmp_path}", f"hydra.run.dir={parent / 'run'}")
        message = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is read-only for this user" in message
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_the_read_only_check_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where chmod cannot make a folder read-only (root), ``os.access`` is what decides: answer as it would."""
    from transfer.core.errors import ConfigError
    from transfer.training.preflight import check_writable

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"cannot be written: .* is read-only for this user"):
        check_writable(tmp_path / "run")


def test_orphan_temp_files_are_removed_at_the_next_start_or_resume(tmp_path: Path):
    from transfer.training.preflight import check_checkpoint, check_fresh

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    dead = 2**22 + 12345  # above Linux's default pid_max: no process has it
    orphan, live = ckpts / f".last.ckpt.{dead}.ab12cd.tmp", ckpts / f".last.ckpt.{os.getpid()}.ef34gh.tmp"
    orphan.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert remove_orphans(ckpts) == [orphan] and live.exists()
    live.unlink()
    orphan.write_bytes(b"half")
    check_fresh(tmp_path / "run")  # only debris there: the run may start
    assert not orphan.exists()
    atomic_torch_save({"state_dict": {}, "loops": {}}, ckpts / "last.ckpt")
    orphan.write_bytes(b"half")
    check_checkpoint(ckpts / "last.ckpt")
    assert not orphan.exists() and (ckpts / "last.ckpt").exists()
