"""The lr range test: its curve starts at a fresh head's loss, and a missing suggestion says why."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.helpers import TINY
from transfer.conf import CONF_DIR
from transfer.experiments.lr_find import debiased, lr_range_test, no_suggestion_reason

CLASSES = 3  # tests.helpers.CLASSES; 30 training images in batches of 8: 3 steps per epoch


def _cfg(tiny_cifar: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "tools/lr_find",
            overrides=[
                "model=resnet18",
                "model.name=tiny_test_cnn",
                "model.pretrained=false",
                f"data.root={tiny_cifar}",
                *TINY,
                "finetune.unfreeze_at_epoch=0",
                *overrides,
            ],
        )


def test_the_curve_starts_at_the_loss_of_a_fresh_head(tiny_models, tiny_cifar: Path, tmp_path: Path):
    # lr_find.min_lr tiny: the first steps barely move the weights, so each early point is about the same loss
    cfg = _cfg(tiny_cifar, "lr_find.min_lr=1e-9", "lr_find.max_lr=1e-8", "lr_find.num_training=6")
    lr_range_test(cfg, tmp_path)
    losses = json.loads((tmp_path / "lr_find.json").read_text())["loss"]
    assert len(losses) == 6
    # a fresh 3-class head predicts about uniformly: cross-entropy ln 3 (label smoothing does not change that)
    assert losses[0] == pytest.approx(math.log(CLASSES), rel=0.15)
    assert losses[-1] == pytest.approx(losses[0], rel=0.15)  # no ramp-up from a biased start


def test_a_range_test_with_too_few_steps_says_why_there_is_no_suggestion(tiny_models, tiny_cifar, tmp_path: Path):
    result = lr_range_test(_cfg(tiny_cifar, "lr_find.num_training=20"), tmp_path)  # 2 epochs: 6 steps of 20
    assert result["suggested_lr"] is None
    assert "recorded 6 of the 20" in result["no_suggestion"] and "data ran out" in result["no_suggestion"]
    assert json.loads((tmp_path / "lr_find.json").read_text())["no_suggestion"] == result["no_suggestion"]


def test_the_bias_correction_undoes_lightnings_step_ahead_average():
    beta, raw = 0.98, [2.0, 1.0, 3.0, 2.5]
    avg, lightning = 0.0, []
    for step, loss in enumerate(raw, start=1):  # Lightning's _LRCallback: global_step already counts the step
        avg = beta * avg + (1 - beta) * loss
        lightning.append(avg / (1 - beta ** (step + 1)))
    expected, avg = [], 0.0
    for n, loss in enumerate(raw, start=1):  # the moving average of the first n losses, debiased
        avg = beta * avg + (1 - beta) * loss
        expected.append(avg / (1 - beta**n))
    assert debiased(lightning, beta=beta) == pytest.approx(expected)
    assert debiased(lightning, beta=beta)[0] == pytest.approx(raw[0])


def test_each_reason_names_the_setting_to_change():
    assert "raise lr_find.num_training" in no_suggestion_reason([1.0] * 12, 12)
    assert "diverged" in no_suggestion_reason([1.0, 0.9, 0.8, 5.0], 100)
    assert "not finite" in no_suggestion_reason([1.0, float("nan")] * 7, 14)
