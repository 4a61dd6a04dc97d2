"""Resilience: bad settings refused before anything is touched, the divergence guard, atomic checkpoints,
graceful stops and sweeps that survive their jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, TINY_CNN, child_cache
from tests.in_process import run_tool
from tests.tiny_models import TINY_MAIN
from transfer.core.errors import ConfigError, DivergenceError
from transfer.training.preflight import problems, resume_path, validate

SMALL = ["model=resnet18", "model.pretrained=false", "~callbacks.ema", *TINY]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m transfer.run`` in this process; the signal tests below start real ones."""
    return run_tool("transfer.run", *args, env=env)


def old_run_dir(path: Path) -> dict[Path, tuple[int, bytes]]:
    """A directory that looks like a finished run; returns every file's (mtime, bytes) to compare later."""
    (path / ".hydra").mkdir(parents=True)
    (path / "checkpoints").mkdir()
    (path / ".hydra" / "config.yaml").write_text("old: config\n")
    (path / ".hydra" / "overrides.yaml").write_text("- old=1\n")
    (path / "checkpoints" / "last.ckpt").write_bytes(b"old checkpoint")
    return snapshot(path)


def flat(text: str) -> str:
    """Error text with its line wrapping undone."""
    return " ".join(text.split())


class Payload:
    """Pickles to a call of ``os.system``: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def snapshot(path: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("optimizer.lr=-1", "optimizer.lr=-1 must be a positive number"),
        ("finetune.bn=foo", "finetune.bn='foo' must be train or frozen"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be a positive integer"),
        ("label_smoothing=1.5", "label_smoothing=1.5 must be in [0, 1)"),
        ("data.batch_size=abc", "data.batch_size='abc' must be a positive integer"),
        ("finetune.unfreeze_at_epoch=-2", "finetune.unfreeze_at_epoch=-2 must be null"),
        ("data=imagefolder", "data.root is required"),
    ],
)
def test_each_bad_setting_is_named_with_what_it_must_be(compose_cfg, override: str, expected: str):
    found = problems(compose_cfg(override))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_the_default_config_and_every_experiment_pass(compose_cfg):
    assert problems(compose_cfg()) == []
    for experiment in ("seed_resnet18", "seed_alexnet"):
        assert problems(compose_cfg(f"+experiment={experiment}")) == []


def test_several_bad_settings_make_one_paragraph(compose_cfg, tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("data.batch_size=0", "optimizer.lr=-1", f"resume={tmp_path / 'nope.ckpt'}"))
    text = str(info.value)
    assert text.startswith("Invalid settings: data.batch_size=0") and "optimizer.lr=-1" in text
    assert "nope.ckpt does not exist" in text and "\n" not in text


def test_resume_accepts_a_run_directory(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_path(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"without checkpoints/last\.ckpt"):
        resume_path(tmp_path / "empty")


def test_bad_settings_exit_2_before_data_or_hydra_files_are_touched(tmp_path: Path):
    before = old_run_dir(tmp_path / "old")
    start = time.perf_counter()
    proc = run(
        *SMALL,
        "data.batch_size=0",
        "optimizer.lr=-1",
        "finetune.bn=foo",
        f"data.root={tmp_path / 'absent'}",
        f"hydra.run.dir={tmp_path / 'old'}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = flat(proc.stderr)
    assert "error: Invalid settings: data.batch_size=0" in text and "finetune.bn='foo'" in text
    assert "Traceback" not in proc.stderr and "CIFAR-10 was not found" not in proc.stderr  # no data was looked at
    assert snapshot(tmp_path / "old") == before
    assert time.perf_counter() - start < 60


def test_a_refused_run_directory_keeps_its_hydra_files(tiny_cifar: Path, tmp_path: Path):
    before = old_run_dir(tmp_path / "old")
    proc = run(f"data.root={tiny_cifar}", f"hydra.run.dir={tmp_path / 'old'}", *SMALL)
    assert proc.returncode == 2 and "refusing to overwrite" in flat(proc.stderr) and "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "old") == before


def test_resume_from_a_text_file_is_one_paragraph(tiny_cifar: Path, tmp_path: Path, compose_cfg):
    from transfer.run import prepare

    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read as a checkpoint with weights_only=True"):
        prepare(compose_cfg(*SMALL, f"data.root={tiny_cifar}", f"resume={bogus}"))


def test_a_checkpoint_carrying_code_is_refused_not_run(
    tiny_cifar: Path, tmp_path: Path, compose_cfg, monkeypatch: pytest.MonkeyPatch
):
    from transfer.run import prepare

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "payload": Payload(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ConfigError, match="could run code"):
        prepare(compose_cfg(*SMALL, f"data.root={tiny_cifar}", f"resume={evil}"))
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused(tiny_cifar: Path, tmp_path: Path, compose_cfg):
    from transfer.run import prepare

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": {"model": {"name": "alexnet"}}}, other)
    with pytest.raises(ConfigError, match=r"model=alexnet but this run builds model=resnet18\. Pass model=alexnet"):
        prepare(compose_cfg(*SMALL, f"data.root={tiny_cifar}", f"resume={other}"))


def test_a_checkpoint_of_other_classes_is_refused(tiny_cifar: Path, tmp_path: Path, compose_cfg):
    from transfer.run import prepare

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "transfer": {"class_names": ["a", "b"]}}, other)
    with pytest.raises(ConfigError, match=r"trained on 2 classes \(a, b\) but the data has 3 \(cat, dog, ship\)"):
        prepare(compose_cfg(*SMALL, f"data.root={tiny_cifar}", f"resume={other}"))


def test_help_describes_the_tool_its_groups_and_examples():
    proc = run("--help")
    assert proc.returncode == 0
    out = proc.stdout
    assert "fine-tune an ImageNet-pretrained image classifier" in out
    assert "model: alexnet" in out and "optimizer: adam, adamw, sgd" in out and "data: cifar10, imagefolder" in out
    assert "python -m transfer.run -m model=resnet18" in out and "resume=" in out
    assert "is powered by Hydra" not in out


def test_slurm_launcher_off_a_cluster_is_one_paragraph(tmp_path: Path):
    proc = run(
        "-m", "hydra/launcher=slurm", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", env={"PATH": str(tmp_path)}
    )  # no sbatch on it
    assert proc.returncode == 2 and "sbatch" in flat(proc.stderr) and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_failing_sweep_job_is_recorded_the_others_run_and_the_sweep_fails(tiny_cifar: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = run(
        "-m",
        "optimizer.lr=1e-3,-1",
        f"data.root={tiny_cifar}",
        f"hydra.sweep.dir={sweep}",
        *[a for a in SMALL if not a.startswith("trainer.max_epochs")],
        "trainer.max_epochs=1",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    ok, bad = sweep / "0", sweep / "1"
    assert (ok / "summary.json").exists() and not (ok / "failed.json").exists()
    record = json.loads((bad / "failed.json").read_text())
    assert record["reason"].startswith("Invalid setting: optimizer.lr=-1") and "optimizer.lr=-1" in record["overrides"]
    report = (sweep / "report.md").read_text()
    assert "## Failed jobs (1 of 2)" in report and "| 1 | optimizer.lr=-1 | Invalid setting" in report
    assert f"job {bad.name} failed: Invalid setting" in flat(proc.stderr) and "Traceback" not in proc.stderr


def test_report_lists_failed_and_killed_jobs(tmp_path: Path):
    from tests.experiments.test_report import fake_job
    from transfer.experiments.report import write_report

    fake_job(tmp_path, "0", "resnet18", 1, [0.5, 0.7], 0.7, ["seed=1"])
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "failed.json").write_text(
        json.dumps({"reason": "Weights for x are not available", "overrides": ["seed=2"]})
    )
    (tmp_path / "2" / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    md = write_report(tmp_path).read_text()
    assert "## Failed jobs (2 of 3)" in md and "| 1 | seed=2 | Weights for x are not available |" in md
    assert "| 2 | seed=3 | no summary.json or failed.json" in md
    csv_text = (tmp_path / "report.csv").read_text()
    assert csv_text.count(",failed,") == 2 and ",ok," in csv_text


def test_atomic_save_never_leaves_a_broken_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transfer.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, target)
    real_save = torch.save

    def crash_mid_write(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_the_trainer_writes_checkpoints_atomically(compose_cfg, tmp_path: Path):
    from transfer.training.checkpoint_io import AtomicCheckpointIO
    from transfer.training.train import build_trainer

    trainer = build_trainer(compose_cfg(*SMALL[3:]), tmp_path, [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_nan_loss_stops_the_run_naming_epoch_step_and_rates_and_keeps_the_last_good_checkpoint(
    tiny_models, compose_cfg, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from transfer.data import ClassificationData
    from transfer.training.train import train

    real = ClassificationData.prepare_batch

    def poisoned(self, batch, train):  # the 5th training batch (epoch 1, step 4) holds a NaN pixel
        ready = real(self, batch, train)
        if train and self.trainer is not None and self.trainer.global_step == 4:
            x = ready.x.clone()
            x[0, 0, 0, 0] = float("nan")
            return ready._replace(x=x)
        return ready

    monkeypatch.setattr(ClassificationData, "prepare_batch", poisoned)
    cfg = compose_cfg(
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "~callbacks.ema",
        "optimizer=adam",
        "scheduler=plateau",
        f"data.root={tiny_cifar}",
        *TINY[:1],
        "trainer.max_epochs=3",
        *TINY[2:],
    )
    with pytest.raises(DivergenceError) as info:
        train(cfg, tmp_path / "run")
    text = str(info.value)
    assert "loss was nan" in text and "at epoch 2, step 4" in text and "rates head 0.001, backbone " in text
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(last) in text
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def test_a_loss_above_max_loss_stops_the_run(tiny_models, compose_cfg, tiny_cifar: Path, tmp_path: Path):
    from transfer.training.train import train

    cfg = compose_cfg(
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "~callbacks.ema",
        f"data.root={tiny_cifar}",
        "callbacks.divergence_guard.max_loss=0.5",
        *TINY,
    )
    with pytest.raises(DivergenceError, match=r"above callbacks.divergence_guard.max_loss=0.5\) at epoch 1, step 0"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# A fast CLI run's arguments: TINY_MAIN registers tiny_test_cnn in the child process.
TINY_MODEL = [*TINY_CNN, *[a for a in TINY if not a.startswith("trainer.max_epochs")]]
ROOT = Path(__file__).resolve().parent.parent


def tiny_command(*args: str) -> list[str]:
    return [sys.executable, "-c", TINY_MAIN, *TINY_MODEL, *args]


def tiny_env() -> dict[str, str]:
    """The environment of the tiny child runs: short errors, the shared decode cache."""
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "TRANSFER_CACHE": child_cache()}


# The same handler serves both signals: the default suite sends one (a real child process: ~15 s).
@pytest.mark.parametrize(
    "signum, status", [pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow), (signal.SIGINT, 130)]
)
def test_a_signal_saves_a_resumable_checkpoint_and_prints_the_resume_command(
    tiny_models, tiny_cifar: Path, tmp_path: Path, signum: int, status: int
):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        tiny_command(f"data.root={tiny_cifar}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tiny_env(),
        cwd=ROOT,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == status, err[-3000:]
    saved = run_dir / "checkpoints" / "interrupted.ckpt"
    lines = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(lines) == 1 and f"resume={saved}" in lines[0] and "Traceback" not in err
    assert lines[0].split("Resume with: ")[1].startswith("python -m transfer.run ")
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["global_step"] >= 3
    # and it resumes from that step, on to the end
    resumed = run(
        *TINY_MODEL,
        f"data.root={tiny_cifar}",
        f"resume={saved}",
        f"hydra.run.dir={tmp_path / 'resumed'}",
        f"trainer.max_epochs={ckpt['epoch'] + 2}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert len(history["epochs"]) == ckpt["epoch"] + 2  # the epochs before the stop, the stopped one, one more


def test_slurm_requeue_handler_survives(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Lightning's SIGUSR1 auto-requeue handler is installed next to the SIGTERM handling."""
    from transfer.training.train import build_trainer

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS_PER_NODE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    trainer = build_trainer(compose_cfg(*SMALL[3:]), tmp_path, [])
    old = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    try:
        trainer._signal_connector.register_signal_handlers()
        handler = signal.getsignal(signal.SIGUSR1)
        assert "_slurm_sigusr_handler_fn" in repr(getattr(handler, "signal_handlers", handler))
    finally:
        trainer._signal_connector.teardown()
        signal.signal(signal.SIGUSR1, old[0])
        signal.signal(signal.SIGTERM, old[1])


def test_a_failed_single_run_exits_2_and_records_why(tiny_models, tmp_path: Path):
    from tests.helpers import make_image_folder

    root = make_image_folder(tmp_path / "photos", {"train": 6})
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    args = [
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "trainer=cpu",
        "data=imagefolder",
        f"data.root={root}",
        "data.num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"1 image file(s) could not be decoded: {root / 'train' / 'cat' / 'broken.jpg'}" in flat(proc.stderr)
    record = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert record["reason"].startswith("1 image file(s) could not be decoded")
    assert record["error"] == "CorruptImagesError"
