"""The budget's input size: the measured table, and where a budgeted run's config follows it."""

from __future__ import annotations

import logging

import pytest

from transfer.training.budget_config import budgeted_config
from transfer.training.budget_recipe import CPU_SIZE_RULES, SizeRule, budget_image_size

LITE0 = "efficientnet_lite0"


def test_the_table_picks_the_rule_with_the_largest_budget_that_fits():
    rules = (SizeRule("m", 32, 240.0, 80), SizeRule("m", 32, 900.0, 96), SizeRule("other", 32, 60.0, 48))
    assert budget_image_size("m", 32, 239.0, gpu=False, rules=rules) is None
    assert budget_image_size("m", 32, 240.0, gpu=False, rules=rules) == 80
    assert budget_image_size("m", 32, 899.0, gpu=False, rules=rules) == 80
    assert budget_image_size("m", 32, 3600.0, gpu=False, rules=rules) == 96
    assert budget_image_size("m", 28, 3600.0, gpu=False, rules=rules) is None  # another native size
    assert budget_image_size("m", None, 3600.0, gpu=False, rules=rules) is None  # photos
    assert budget_image_size("m", 32, 3600.0, gpu=True, rules=rules) is None  # measured on a CPU only


def test_lite0_on_cifar_is_fed_80_px_from_four_minutes_on_a_cpu():
    assert any(r.model == LITE0 for r in CPU_SIZE_RULES)
    assert budget_image_size(LITE0, 32, 120.0, gpu=False) is None  # 64 px won at 2 minutes
    assert budget_image_size(LITE0, 32, 240.0, gpu=False) == 80
    assert budget_image_size(LITE0, 32, 900.0, gpu=False) == 80
    assert budget_image_size("efficientnet_lite1", 32, 900.0, gpu=False) is None  # not measured


def test_a_budgeted_run_follows_the_table_where_the_size_is_left_to_the_model(compose_cfg, caplog):
    cfg = compose_cfg("budget=4m", "trainer.accelerator=cpu")
    with caplog.at_level(logging.INFO, logger="transfer.training.budget_recipe"):
        run = budgeted_config(cfg)
    assert run.data.image_size == 80 and cfg.data.image_size is None  # the composed config is untouched
    assert "efficientnet_lite0 at 80 px" in caplog.text and "data.image_size=<px>" in caplog.text


@pytest.mark.parametrize(
    "overrides",
    [
        ("budget=2m",),  # below the smallest measured budget
        ("budget=15m", "data.image_size=64"),  # the user's size
        ("budget=15m", "model.adapt=native"),  # the adapted stem at the data's own 32 px
        ("budget=15m", "trainer.accelerator=gpu"),  # not measured on a GPU
        ("budget=15m", "model=efficientnet_lite1"),  # not measured
        ("budget=15m", "data=imagefolder", "data.root=/nowhere"),  # photos have no native size
    ],
)
def test_a_budgeted_run_keeps_its_size_outside_the_table(compose_cfg, overrides):
    cfg = compose_cfg(*overrides, *(() if "trainer.accelerator=gpu" in overrides else ("trainer.accelerator=cpu",)))
    assert budgeted_config(cfg).data.image_size == cfg.data.image_size


def test_no_budget_keeps_the_default_size(compose_cfg):
    cfg = compose_cfg("trainer.accelerator=cpu")
    assert budgeted_config(cfg).data.image_size is None
