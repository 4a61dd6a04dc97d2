"""The measurements behind the Lightning-overhead rows: the framework's step and the raw step of one recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from transfer.benchmarks import measure


def test_the_default_recipes_step_is_timed_through_lightning_and_raw(tiny_cifar: Path, capsys: pytest.CaptureFixture):
    args = ["--data", str(tiny_cifar), "--recipe", "--size", "32", "--batch-size", "4", "--warmup", "1", "--steps", "2"]
    measure.main(["train_lightning", *args])
    measure.main(["train_raw", *args])
    ours, raw = (json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert ours["measure"] == "train_lightning" and raw["measure"] == "train_raw"
    assert ours["images_per_s"] > 0 and raw["images_per_s"] > 0
    # Lite0's training FLOPs at 32 px with its lowest layers frozen: well under the ~0.4 GFLOP forward at 224 px
    assert 0 < ours["flops_per_image"] < 1e8


def test_the_recipes_parts_are_the_default_runs_model_and_optimizer(tiny_cifar: Path):
    args = argparse.Namespace(data=str(tiny_cifar), recipe=True, size=48, batch_size=4)
    dm, module = measure._train_parts(args)
    assert module.model.meta.name == "efficientnet_lite0" and module.model.fixed  # the lowest layers kept fixed
    assert dm.hparams["preprocess"]["image_size"] == 48
    assert module.hparams["optimizer"]["fused"] and module.hparams["label_smoothing"] == 0.1
