"""budget=<duration>: the plan's arithmetic, the planner on a fake clock, and real tiny runs planned to it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import TINY
from tests.in_process import run_tool
from transfer.core.errors import ConfigError
from transfer.training.budget_config import budgeted_config
from transfer.training.budget_plan import (
    MAX_VALIDATIONS,
    MIN_VALIDATION_IMAGES,
    VALIDATION_SHARE,
    count_validations,
    describe_plan,
    drifted_eval_seconds,
    make_plan,
    output_margin,
    replan,
    steps_at_cost,
    validation_interval,
)

TINY_MODEL = ["model=resnet18", "model.name=tiny_test_cnn", "model.pretrained=false"]
LR = 1e-3
FLOOR = LR / 25 / 1e4  # conf/scheduler/onecycle.yaml: OneCycleLR's defaults, div_factor 25, final_div_factor 1e4


def test_the_steps_fill_what_the_budget_leaves_after_time_spent_evaluation_and_the_margin():
    # no evaluation cost: (100 s - 10 s spent - margin) / 0.5 s per step, after the 20 probe steps
    plan = make_plan(100, 10, 0.5, 0.0, steps_done=20, steps_per_epoch=50, val_images=0, test_images=0)
    assert plan.planned_steps == 20 + math.floor((100 - 10 - output_margin(100)) / 0.5)
    # with evaluation: every planned second adds up to the budget, and one more step would not fit
    args = {"steps_done": 20, "steps_per_epoch": 700, "val_images": 5000, "test_images": 20000}
    plan = make_plan(600, 60, 0.1, 0.001, **args)
    new_steps = plan.planned_steps - 20
    assert plan.validations == count_validations(20, plan.planned_steps, plan.val_every_steps)
    assert plan.eval_s == pytest.approx(plan.validations * 5.0 + 20.0)
    used = 60 + new_steps * 0.1 + plan.eval_s + plan.margin_s
    assert 600 - 0.1 < used <= 600
    assert plan.epochs == pytest.approx(plan.planned_steps / 700)
    slower = make_plan(600, 60, 0.2, 0.001, **args)
    assert slower.planned_steps - 20 < new_steps  # half the speed: fewer steps in the same budget
    later = make_plan(600, 300, 0.1, 0.001, **args)  # resumed with 300 s already spent
    assert later.planned_steps < plan.planned_steps


def test_a_run_without_a_validation_split_plans_none_and_says_so():
    args = {"steps_done": 20, "steps_per_epoch": 50, "test_images": 100}
    plan = make_plan(600, 10, 0.5, 0.01, val_images=0, **args)  # data.train_on_val
    assert plan.validations == 0 and plan.eval_s == pytest.approx(1.0) and "no validation" in describe_plan(plan)
    again = replan(plan, 100, 0.5, 0.01, steps_done=200, val_images=0, test_images=100)
    assert again.validations == 0 and "no validation" in describe_plan(again)
    validated = make_plan(600, 10, 0.5, 0.01, val_images=100, **args)
    assert validated.validations > 0 and f"{validated.validations} validations" in describe_plan(validated)


def test_validations_come_every_epoch_in_a_few_epoch_run_and_at_most_a_few_times_otherwise():
    assert validation_interval(300, 100) == 100  # 3 epochs: each epoch
    assert validation_interval(10_000, 100) == 2500  # 100 epochs: MAX_VALIDATIONS of them
    every = validation_interval(10_000, 100)
    assert count_validations(0, 10_000, every) == MAX_VALIDATIONS
    assert count_validations(20, 250, 100) == 3  # steps 100 and 200, and one at the last step


def test_validations_past_their_share_of_the_budget_score_fewer_whole_batches():
    args = {"steps_done": 20, "steps_per_epoch": 10_000, "val_images": 5000, "test_images": 10_000}
    # 2 ms an image: one 10 s validation is 8% of a 2-minute budget
    short = make_plan(120, 20, 0.3, 0.002, **args, eval_batch_size=256)
    assert short.validations == 1
    assert short.val_batches == math.floor(VALIDATION_SHARE * 120 / (256 * 0.002)) == 4
    assert short.eval_s == pytest.approx(4 * 256 * 0.002 + 20)
    uncapped = make_plan(120, 20, 0.3, 0.002, **args)  # no batch size given: the whole split
    assert uncapped.val_batches is None and short.planned_steps > uncapped.planned_steps
    long = make_plan(7200, 20, 0.3, 0.002, **args, eval_batch_size=256)  # 3 validations, 30 s of 7200: all of it
    assert long.validations == 3 and long.val_batches is None
    # a small photo set at 10 ms an image: past the share, but 341 images are fewer than the floor, so all of them
    photos = {**args, "val_images": 341, "test_images": 372, "steps_per_epoch": 95}
    assert make_plan(120, 20, 0.5, 0.01, **photos, eval_batch_size=128).val_batches is None
    floor = {**args, "test_images": 1000}  # 10 s of test; one 50 s validation would be 42% of the budget
    assert make_plan(120, 20, 0.3, 0.01, **floor, eval_batch_size=128).val_batches == MIN_VALIDATION_IMAGES // 128


def test_a_budget_too_small_for_one_step_names_the_minimum_and_the_minimum_fits():
    args = {"steps_done": 20, "steps_per_epoch": 10, "val_images": 100, "test_images": 100}
    with pytest.raises(ConfigError, match=r"budget=10s leaves no time to train.*at least (\d+) s") as err:
        make_plan(10, 9.0, 0.5, 0.01, **args)
    assert "\n" not in str(err.value)
    minimum = int(re.search(r"at least (\d+) s", str(err.value)).group(1))
    assert make_plan(minimum, 9.0, 0.5, 0.01, **args).planned_steps >= 21
    with pytest.raises(ConfigError):
        make_plan(minimum - 1, 9.0, 0.5, 0.01, **args)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _trained_steps(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])


@pytest.mark.slow  # a real run that takes its whole 25 s budget
def test_a_tiny_run_ends_near_its_budget_with_the_lr_at_the_schedules_floor(tiny_models, tiny_cifar, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY_MODEL, f"data.root={tiny_cifar}", f"hydra.run.dir={run_dir}", *TINY, "budget=25s"]
    out = run_tool("transfer.run", *overrides, f"optimizer.lr={LR}")
    assert out.returncode == 0, out.stderr[-2000:]
    budget = _summary(run_dir)["budget"]
    assert budget["budget_s"] == 25 and 0.7 * 25 <= budget["wall_s"] <= 1.3 * 25  # a shared machine: +-30%
    assert budget["planned_steps"] == _trained_steps(run_dir) > 20  # exactly the planned steps, past the probe
    assert budget["epochs"] == pytest.approx(budget["planned_steps"] / 3, rel=1e-3)  # 3 steps per epoch
    assert budget["seconds_per_step"] > 0 and budget["eval_seconds_per_image"] > 0
    assert 0 < budget["spent_before_training_s"] < budget["wall_s"] and budget["image_size"] == 32
    assert budget["lr_end"]["head"] == pytest.approx(FLOOR, rel=1e-6)
    assert re.search(r"budget 25 s, actual [\d.]+ s \([+-][\d.]+%\)$", out.stdout.strip())
    # what was tested: the final step's weights (the schedule's floor), whatever the earlier validations scored
    summary = _summary(run_dir)
    tested = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert summary["selected_by"] == "final" and tested["global_step"] == budget["planned_steps"]
    assert "(final checkpoint: epoch" in out.stdout


class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the run's own gets to run after it."""


class KillAfterFirstValidation(L.Callback):
    """Kill the run at the first step after its first validation (and last.ckpt) ran."""

    def __init__(self) -> None:
        self.validations = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validations += not trainer.sanity_checking

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.validations >= 1:
            raise Killed


@pytest.mark.slow  # two real runs that share one 25 s budget
def test_a_resumed_run_replans_what_is_left_of_the_budget(tiny_models, compose_cfg, tiny_cifar, tmp_path, monkeypatch):
    import transfer.training.train as T

    def cfg(*extra: str):
        return compose_cfg(*TINY_MODEL, f"data.root={tiny_cifar}", *TINY, "budget=25s", f"optimizer.lr={LR}", *extra)

    configured = T._configured_callbacks
    monkeypatch.setattr(T, "_configured_callbacks", lambda c: [*configured(c), KillAfterFirstValidation()])
    with pytest.raises(Killed):
        T.train(cfg(), tmp_path / "killed")
    monkeypatch.setattr(T, "_configured_callbacks", configured)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    stopped_at = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])

    summary = T.train(cfg(f"resume={last}"), tmp_path / "resumed")
    budget = summary["budget"]
    assert 0 < budget["resumed_spent_s"] < budget["wall_s"]  # the first run's time counts against the budget
    assert 0.7 * 25 <= budget["wall_s"] <= 1.3 * 25
    assert budget["planned_steps"] == _trained_steps(tmp_path / "resumed") > stopped_at + 20  # re-planned, probed
    assert budget["lr_end"]["head"] == pytest.approx(FLOOR, rel=1e-6)


def test_a_replan_sizes_the_rest_from_the_speed_kept_since_the_plan():
    args = {"steps_done": 20, "steps_per_epoch": 100, "val_images": 1000, "test_images": 1000}
    plan = make_plan(600, 60, 0.5, 0.001, **args)
    # at step 220 the run has spent 200 s: it trains at 0.7 s per step, not the probe's 0.5
    later = replan(plan, 200, 0.7, 0.001, steps_done=220, val_images=1000, test_images=1000)
    assert later.val_every_steps == plan.val_every_steps and later.steps_done == 220
    used = 200 + (later.planned_steps - 220) * 0.7 + later.eval_s + later.margin_s
    assert 600 - 0.7 < used <= 600  # the rest fills the budget at the new speed, one step short at most
    assert later.validations == count_validations(220, later.planned_steps, plan.val_every_steps)
    faster = replan(plan, 200, 0.3, 0.001, steps_done=220, val_images=1000, test_images=1000)
    assert faster.planned_steps > plan.planned_steps > later.planned_steps
    over = replan(plan, 650, 0.5, 0.001, steps_done=220, val_images=1000, test_images=1000)
    assert over.planned_steps == 221  # already past the budget: one more step and stop, not an error


class CheapFirstHalf:
    """Steps in the first half of a plan cost ``cheap`` of a full-size step (progressive resizing's shape)."""

    def __init__(self, cheap: float) -> None:
        self.cheap = cheap

    def trained(self, start: int, end: int) -> float:
        return float(end - start)

    def ahead(self, done: int, planned: int) -> float:
        return sum(self.cheap if step < planned / 2 else 1.0 for step in range(done, planned))


def test_a_plan_is_lengthened_by_what_its_steps_ahead_cost():
    assert steps_at_cost(CheapFirstHalf(0.25), 0, 100) == 160  # 80 steps at 0.25 and 80 at 1 cost 100 full steps
    assert steps_at_cost(CheapFirstHalf(1.0), 0, 100) == 100  # no cheaper steps: the plan as sized
    assert steps_at_cost(CheapFirstHalf(0.25), 200, 100) == 300  # past the half: every step ahead costs a full one


class FakeClock:
    """``time.time()`` of the planner: the tiny model below advances it, the machine's speed plays no part."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class SlowsDown(L.LightningModule):
    """Each training step 'takes' 1 s for the first ``fast`` steps and 1.5 s after; each evaluated image 0.01 s."""

    def __init__(self, clock: FakeClock, fast: int) -> None:
        super().__init__()
        self.clock, self.fast, self.net = clock, fast, torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0 if self.global_step < self.fast else 1.5
        return self.net(batch[0]).pow(2).mean()

    def forward(self, x):
        self.clock.now += 0.01 * len(x)
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    test_step = validation_step

    def configure_optimizers(self):
        from transfer.training.optim import build_scheduler

        opt = torch.optim.SGD(self.parameters(), lr=LR)
        return {"optimizer": opt, "lr_scheduler": build_scheduler(ONECYCLE, opt)}


class TwoPoints(L.LightningDataModule):
    eval_batch_size = 10

    def __init__(self, val_size: int = 20) -> None:
        super().__init__()
        self.val_size = val_size

    def describe(self) -> dict:
        return {"val_size": self.val_size, "test_size": 20}

    def _loader(self, n: int):
        data = torch.utils.data.TensorDataset(torch.randn(n, 2), torch.zeros(n, dtype=torch.long))
        return torch.utils.data.DataLoader(data, batch_size=10)

    def train_dataloader(self):
        return self._loader(500)  # 50 steps per epoch

    def val_dataloader(self):
        return self._loader(self.val_size)

    def test_dataloader(self):
        return self._loader(20)


ONECYCLE = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": LR, "total_steps": 10**7, "interval": "step"}


def _fake_clock_run(monkeypatch, tmp_path: Path):
    """A 600 s budget's planner on the fake clock, and an open-ended trainer that follows it."""
    import transfer.training.budget as B

    clock = FakeClock()
    monkeypatch.setattr(B, "time", clock)
    planner = B.BudgetPlanner(600, started=clock.now, scheduler=ONECYCLE)
    trainer = L.Trainer(
        max_steps=10**7, val_check_interval=10**7, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[planner], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    return clock, planner, trainer


@pytest.mark.parametrize("val_size", [20, 0])  # validations, and none to re-plan at: every eighth of the steps then
def test_a_run_that_slows_after_its_probe_still_ends_at_the_budget(val_size, monkeypatch, tmp_path: Path):
    clock, planner, trainer = _fake_clock_run(monkeypatch, tmp_path)
    model = SlowsDown(clock, fast=60)
    trainer.fit(model, datamodule=TwoPoints(val_size))
    trainer.test(model, datamodule=TwoPoints(val_size), verbose=False)
    first = make_plan(600, 20.2, 1.0, 0.01, steps_done=20, steps_per_epoch=50, val_images=val_size, test_images=20)
    assert planner.plan is not None and planner.plan.planned_steps == trainer.global_step < first.planned_steps
    assert planner.replans >= 4  # after each validation but the last, and every eighth of the planned steps
    spent = clock.now - 1000.0
    assert 600 * 0.98 <= spent + planner.plan.margin_s <= 600  # the probe's plan alone would end 50% late
    assert planner.lr_end["pg1"] == pytest.approx(LR / 25 / 1e4, rel=1e-6)  # the schedule still ends at its floor


class WritesCheckpoints(L.Callback):
    """Each validation's end costs 5 s of the fake clock, as writing a checkpoint does."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_validation_end(self, trainer, pl_module) -> None:
        self.clock.now += 5.0


class SmallValidationLargeTest(TwoPoints):
    def describe(self) -> dict:
        return {"val_size": 10, "test_size": 2000}

    def test_dataloader(self):
        return self._loader(2000)  # 20 s of scoring; 1000 s if each image carried a share of the 5 s checkpoint


def test_a_validations_checkpoint_is_planned_per_validation_not_per_image(monkeypatch, tmp_path: Path):
    clock, planner, trainer = _fake_clock_run(monkeypatch, tmp_path)
    trainer.callbacks.insert(0, WritesCheckpoints(clock))  # before the planner, as the run's checkpoint callback is
    model = SlowsDown(clock, fast=10**6)
    trainer.fit(model, datamodule=SmallValidationLargeTest(val_size=10))
    trainer.test(model, datamodule=SmallValidationLargeTest(val_size=10), verbose=False)
    assert planner.plan is not None and planner.plan.eval_seconds_per_image == pytest.approx(0.01, rel=0.02)
    assert planner.plan.validations >= 1
    spent = clock.now - 1000.0
    assert 600 * 0.98 <= spent + planner.plan.margin_s <= 600


class SlowsDownEverywhere(SlowsDown):
    """The machine slows 1.5x after ``fast`` steps for evaluation too, as a shared machine's load does."""

    def forward(self, x):
        self.clock.now += 0.01 * len(x) * (1.5 if self.global_step >= self.fast else 1.0)
        return self.net(x)


class LargeTest(TwoPoints):
    def describe(self) -> dict:
        return {"val_size": 0, "test_size": 6000}

    def test_dataloader(self):
        return self._loader(6000)  # 60 s of evaluation at the probe's speed, 90 s once the machine slows


def test_the_test_is_planned_at_the_speed_the_machine_has_slowed_to(monkeypatch, tmp_path: Path):
    clock, planner, trainer = _fake_clock_run(monkeypatch, tmp_path)
    model = SlowsDownEverywhere(clock, fast=60)
    trainer.fit(model, datamodule=LargeTest(val_size=0))
    trainer.test(model, datamodule=LargeTest(val_size=0), verbose=False)
    assert planner.plan is not None and planner.plan.eval_seconds_per_image == pytest.approx(0.015, rel=0.02)
    spent = clock.now - 1000.0
    assert 600 * 0.98 <= spent + planner.plan.margin_s <= 600  # the probe's eval time would end 30 s late


def test_the_eval_time_follows_the_step_time_from_its_measurement():
    assert drifted_eval_seconds(0.002, 0.4, 0.6) == pytest.approx(0.003)
    assert drifted_eval_seconds(0.002, 0.4, 0.2) == pytest.approx(0.001)
    assert drifted_eval_seconds(0.002, 0.0, 0.6) == 0.002  # nothing to scale by


class CountsValidation(SlowsDown):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, fast=10**6)
        self.validated: list[int] = []  # batches of each validation

    def on_validation_epoch_start(self) -> None:
        self.validated.append(0)

    def validation_step(self, batch, batch_idx):
        self.validated[-1] += 1
        self(batch[0])


class LongValidation(TwoPoints):
    """A validation of 2000 images, 20 s of the fake clock: past its share of a 600 s budget."""

    def __init__(self) -> None:
        super().__init__(val_size=2000)

    def val_dataloader(self):
        from transfer.data.loader import ResumableLoader

        n = self.val_size
        return ResumableLoader(torch.utils.data.TensorDataset(torch.randn(n, 2), torch.zeros(n, dtype=torch.long)), 10)


def test_validations_score_the_batches_the_plan_gives_them(monkeypatch, tmp_path: Path):
    import transfer.training.budget as B

    clock = FakeClock()
    monkeypatch.setattr(B, "time", clock)
    planner = B.BudgetPlanner(600, started=clock.now, scheduler=ONECYCLE)
    trainer = L.Trainer(
        **budgeted_config(OmegaConf.create({"budget": 600, "trainer": {}})).trainer,
        callbacks=[planner], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    model = CountsValidation(clock)
    trainer.fit(model, datamodule=LongValidation())
    plan = planner.plan
    assert plan is not None and plan.val_batches is not None and plan.val_batches < 200
    assert model.validated and set(model.validated) == {plan.val_batches}  # no sanity check, each one cut
    assert plan.validations * plan.val_batches * 10 * 0.01 <= VALIDATION_SHARE * 600
