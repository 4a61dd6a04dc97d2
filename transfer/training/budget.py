"""``budget=<duration>``: a run that plans itself to end at a wall-clock budget.

A schedule planned to end exactly at the budget beats an off-the-shelf one cut short (budgeted training, Li, Yumer
and Ramanan, ICLR 2020): ``trainer.max_time`` stops a one-cycle run before it anneals, a budget makes the lr reach
its floor as the time runs out. :func:`~transfer.training.budget_config.budgeted_config` turns the configured
trainer and schedule into an open-ended run (no epoch limit, a provisional length); :class:`BudgetPlanner` then

1. times the first :data:`PROBE_STEPS` training steps, the first :data:`WARMUP_STEPS` of them left out
   (``torch.compile``, cuDNN's autotuning and the loader workers' start land there; the probe steps train on the
   schedule's start), then a few eval-mode forward passes of an eval batch (seconds per evaluated image: the
   validations and the test to come are planned from it);
2. plans (:func:`~transfer.training.budget_plan.make_plan`, pure arithmetic): the optimizer steps that fit into
   what is left of the budget after the time already spent since the process started, the planned validations
   and the final test (split sizes x the measured time per image) and a fixed margin for writing the outputs;
3. applies the plan: ``fit_loop.max_steps``, a validation every epoch when epochs are long or every k steps
   otherwise (at most four, and always one at the last step), and the schedule rebuilt at the
   current step over the planned length (a public constructor call with ``last_epoch``; no private field of
   any scheduler is written);
4. re-plans after every validation and every eighth of the planned steps
   (:func:`~transfer.training.budget_plan.replan`): the steps still to train from the training speed of the
   latest stretch and the latest validation's time, the schedule rebuilt again over the new length. The probe is
   twenty steps on a shared machine; what the run keeps up over minutes is the better measurement, and a run that
   goes slower or faster than its probe still ends at the budget.

The arithmetic is in :mod:`transfer.training.budget_plan`. Under DDP rank 0 measures and plans and every rank
follows its plan (``trainer.strategy.broadcast``). The checkpoint carries the wall time spent so far, so ``resume=``
re-plans what is left of the budget from the step it resumes at.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from transfer.core.errors import ConfigError
from transfer.data.batch import as_batch
from transfer.training.budget_config import length_key, parse_duration, scheduler_config
from transfer.training.budget_plan import (
    Plan,
    StepCost,
    count_validations,
    describe_plan,
    drifted_eval_seconds,
    make_plan,
    replan,
    steps_at_cost,
)
from transfer.training.optim import FreezeGate, build_scheduler

log = logging.getLogger(__name__)

PROBE_STEPS = 20  # timed training steps before the plan (the warm-up steps below included)
REPLAN_FRACTION = 1 / 8  # a re-plan every eighth of the planned steps, and after every validation
EVAL_PROBE_PASSES = 2  # timed eval-mode forward passes of one eval batch, after one untimed
WARMUP_STEPS = 3  # the first steps' times are left out of the probe: compilation, autotuning, worker start


def resize_schedule(trainer: L.Trainer, scheduler: dict[str, Any] | None, total_steps: int) -> None:
    """Rebuild the run's schedule over ``total_steps``, at the step it has reached, in place of the provisional one.

    The scheduler is constructed again through its public constructor with ``last_epoch`` set, so it continues
    from the current step on the new length (the project's per-step schedules compute their rate from the step:
    one-cycle and warm-up cosine in closed form, cosine from its closed form on the first step after a restart).
    """
    key = length_key(scheduler)
    if scheduler is None or key is None or not trainer.lr_scheduler_configs:
        return  # constant rates (scheduler=none): nothing to resize
    config = trainer.lr_scheduler_configs[0]
    old = config.scheduler
    # built with last_epoch = reached - 1, its own first step brings it to the step the old one had reached
    built = build_scheduler({**scheduler, key: total_steps, "last_epoch": old.last_epoch - 1}, trainer.optimizers[0])
    if built is None:
        return
    new = built["scheduler"]
    if isinstance(old, FreezeGate):
        new.set_epoch(old.gate_epoch)
    config.scheduler = new


def _now(trainer: L.Trainer) -> float:
    """The wall clock once the device has finished the queued work (a GPU runs ahead of the host)."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _limit_validation(trainer: L.Trainer, batches: int) -> None:
    """Validate on the first ``batches`` eval batches from now on (fewer than ``limit_val_batches`` allowed).

    Lightning set the validation loop up, counting its loader's batches, when training started, so
    ``limit_val_batches`` no longer acts on it; the loader itself stops early
    (:attr:`~transfer.data.loader.ResumableLoader.max_batches`). ``limit_val_batches`` is set too, for the split
    sizes the re-plans count and for a loop set up again. A loader that cannot be cut validates whole, and the
    re-plan after it measures that.
    """
    trainer.limit_val_batches = batches
    loaders = trainer.val_dataloaders
    cut = 0
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        if loader is not None and hasattr(loader, "max_batches"):
            loader.max_batches, cut = batches, cut + 1
    if not cut:
        log.warning("budget: the validation loader has no max_batches, so each validation scores the whole split")


def _images(size: int, limit: int | float, batch_size: int, world_size: int) -> int:
    """Images of a split one rank evaluates under ``limit_*_batches`` (a fraction or a batch count)."""
    per_rank = math.ceil(size / world_size)
    if isinstance(limit, float):
        return math.ceil(per_rank * limit)
    return min(per_rank, int(limit) * batch_size)


class BudgetPlanner(L.Callback):
    """Measure the run, plan it to end at the budget and apply the plan (see the module docstring).

    Args:
        budget_s: the budget in seconds.
        started: when the budget's clock started (``time.time()`` of the process start).
        scheduler: the ``scheduler`` config of the run as
            :func:`~transfer.training.budget_config.budgeted_config` made it (``None``: constant rates).
        test_passes: forward passes per test image (2 with flip TTA).
        probe_steps: training steps timed before the plan.
    """

    def __init__(
        self,
        budget_s: float,
        started: float,
        scheduler: dict[str, Any] | None = None,
        test_passes: int = 1,
        probe_steps: int = PROBE_STEPS,
    ) -> None:
        self.budget_s, self.started, self.scheduler = budget_s, started, scheduler
        self.test_passes, self.probe_steps = test_passes, max(2, probe_steps)
        self.prior_s = 0.0  # wall time earlier runs spent on this one (resume=)
        self.plan: Plan | None = None
        self.spent_before_training_s: float | None = None
        self.image_size: int | None = None
        self.lr_end: dict[str, float] = {}
        self._probe_start: tuple[float, int] | None = None
        self._probe_end: tuple[float, int, int] | None = None  # time, step and batch images at the probe's end
        self._validation_start: float | None = None
        self._validation_scored_s: float | None = None  # the latest validation's scoring, its checkpoint left out
        self._val_fixed_s = 0.0  # what a validation costs besides scoring: the checkpoint it writes
        # The stretch of training since the plan or the last re-plan: its start (time, step), and the seconds
        # validations (and their checkpoint writing) took inside it.
        self._stretch: tuple[float, int] = (0.0, 0)
        self._paused_s = 0.0
        self._eval_s_per_image: float | None = None  # the probe's, then the latest validation's
        self._eval_step_s: float | None = None  # the training step time when that was measured
        self.replans = 0
        # steps that cost differently on a schedule of the plan (set by progressive resizing): the plan counts
        # in steps at the full size and sizes its length by what the steps ahead cost
        self.step_cost: StepCost | None = None
        self._start_step = 0
        self._stage: str | None = None

    def elapsed(self) -> float:
        """Budget spent so far: this process's wall time since ``started`` and that of the runs it resumes."""
        return self.prior_s + time.time() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"spent_s": self.elapsed(), "budget_s": self.budget_s, "plan": asdict(self.plan) if self.plan else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage in (None, "fit"):  # not when the test restores the best checkpoint
            self.prior_s = float(state_dict.get("spent_s", 0.0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._probe_end is not None and not trainer.sanity_checking:
            self._validation_start = _now(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before any on_validation_end, where the checkpoint callback writes its files
        if self._validation_start is not None:
            self._validation_scored_s = _now(trainer) - self._validation_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step, self.spent_before_training_s = trainer.global_step, self.elapsed()
        preprocess = getattr(pl_module, "preprocess", None)
        self.image_size = preprocess.image_size if preprocess is not None else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.plan is not None:
            if trainer.global_step >= self.plan.planned_steps:
                trainer.should_stop = True  # Lightning validates at a step that stops the run: the final model's
            return
        done = trainer.global_step - self._start_step
        if self._probe_start is None and done >= min(WARMUP_STEPS, self.probe_steps // 2):
            self._probe_start = (_now(trainer), trainer.global_step)
        elif self._probe_start is not None and self._probe_end is None and done >= self.probe_steps:
            self._probe_end = (_now(trainer), trainer.global_step, len(as_batch(batch).y))
            self._eval_s_per_image = self._time_eval(trainer, pl_module, as_batch(batch).x)
            self._plan(trainer, self._measured_plan)
            self._stretch = (_now(trainer), trainer.global_step)

    def _time_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, x: torch.Tensor) -> float:
        """Seconds per image of an evaluation forward pass: the probe's last batch, repeated to an eval batch.

        A few forward passes stand in for the whole validation the probe once ran (9 s of a 2-minute CIFAR-10
        budget on a 2-core CPU); the validations of the run itself then re-measure it, and the checkpoint each one
        writes as a cost per validation (:meth:`_maybe_replan`).
        """
        data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at fit time, undeclared
        size = max(len(x), int(getattr(data, "eval_batch_size", len(x))))
        layout = torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) else None
        full = self.image_size
        if full and x.ndim == 4 and x.shape[-1] != full:  # a training batch at a progressive size: evaluation's is full
            x = torch.nn.functional.interpolate(x, size=(full, full), mode="bilinear", antialias=False)
        images = x.repeat(math.ceil(size / len(x)), *([1] * (x.ndim - 1)))[:size]
        images = images.contiguous(memory_format=layout) if layout else images  # repeat() gives NCHW: 1.12x slower
        # the evaluation's own forward pass (BatchNorm folded), without TTA: the test's passes are counted apart
        forward = getattr(pl_module, "predict_logits", None)
        modes = {module: module.training for module in pl_module.modules()}  # a frozen BN stays in eval mode
        pl_module.eval()
        try:
            with torch.inference_mode():
                run = (lambda: forward(images, tta=False)) if forward else (lambda: pl_module(images))
                run()  # the first eval-mode pass: its kernels' warm-up (and the folding)
                passes = []
                for _ in range(EVAL_PROBE_PASSES):  # the fastest: the evaluation's thousands of batches run warm
                    start = _now(trainer)
                    run()
                    passes.append(_now(trainer) - start)
                return min(passes) / size
        finally:
            getattr(pl_module, "release_inference_model", lambda: None)()
            for module, training in modes.items():
                module.training = training

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.plan is not None:
            self._maybe_replan(trainer)
        if self.plan is not None and trainer.global_step == self.plan.planned_steps - 1:
            self._record_lr(trainer)  # the rates the last step trains at (a one-cycle's floor)

    def _maybe_replan(self, trainer: L.Trainer) -> None:
        """Re-plan after each validation and every :data:`REPLAN_FRACTION` of the planned steps (the same steps
        on every rank: the plan is a collective)."""
        assert self.plan is not None
        validated = self._validation_start is not None
        if self._validation_start is not None:  # the clock is read only here and at a re-plan: no sync per step
            val_images, _ = self._split_images(trainer)
            paused = _now(trainer) - self._validation_start
            scored = paused if self._validation_scored_s is None else self._validation_scored_s
            self._paused_s, self._validation_start, self._validation_scored_s = self._paused_s + paused, None, None
            # Scoring is per image, the checkpoint per validation: on a validation of 10 photos the checkpoint
            # counted per image made the test 8x dearer than it was, and the run ended 10% early.
            self._eval_s_per_image = scored / val_images if val_images else None
            self._val_fixed_s = paused - scored
            self._eval_step_s = None  # measured now: the re-plan's step time is its reference
        every = max(self.probe_steps, math.ceil(self.plan.planned_steps * REPLAN_FRACTION))
        if validated or trainer.global_step - self._stretch[1] >= every:
            self._plan(trainer, self._replanned)
            self.replans += 1
            self._stretch, self._paused_s = (_now(trainer), trainer.global_step), 0.0

    def _record_lr(self, trainer: L.Trainer) -> None:
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        self.lr_end = {str(g.get("name", f"pg{i + 1}")): float(g["lr"]) for i, g in enumerate(groups)}

    def _plan(self, trainer: L.Trainer, measure: Callable[[L.Trainer], Plan]) -> None:
        """Rank 0 plans from its measurements; every rank applies that plan (or raises its error)."""
        planned: Plan | str | None = None
        if trainer.is_global_zero:
            try:
                planned = measure(trainer)
            except ConfigError as err:
                planned = str(err)
        planned = trainer.strategy.broadcast(planned, src=0)
        if not isinstance(planned, Plan):
            raise ConfigError(str(planned))
        self.plan = planned
        trainer.fit_loop.epoch_loop.max_steps = planned.planned_steps
        batches = planned.val_every_steps * trainer.accumulate_grad_batches
        trainer.val_check_interval, trainer.val_check_batch = batches, batches
        if planned.val_batches is not None:
            _limit_validation(trainer, planned.val_batches)
        resize_schedule(trainer, self.scheduler, planned.planned_steps)
        if trainer.is_global_zero:
            log.info("%s", describe_plan(planned))

    def _measured_plan(self, trainer: L.Trainer) -> Plan:
        assert self._probe_start is not None and self._probe_end is not None
        (start, start_step), (end, end_step, batch_images) = self._probe_start, self._probe_end
        step_s = (end - start) / self._full_steps(start_step, end_step)
        val_images, test_images = self._split_images(trainer)
        now = _now(trainer)
        # a training step's time per image bounds an eval pass's from above, for a model that could not be timed
        eval_s = self._eval_s_per_image or step_s / max(1, batch_images * trainer.accumulate_grad_batches)
        self._eval_s_per_image, self._eval_step_s = eval_s, step_s
        return self._at_cost(
            make_plan(
                self.budget_s,
                self.prior_s + now - self.started,
                step_s,
                eval_s,
                steps_done=trainer.global_step,
                steps_per_epoch=max(1.0, trainer.num_training_batches / trainer.accumulate_grad_batches),
                val_images=val_images,
                test_images=test_images * self.test_passes,
                eval_batch_size=int(getattr(trainer.datamodule, "eval_batch_size", 0)),  # type: ignore[attr-defined]
            )
        )

    def _full_steps(self, start: int, end: int) -> float:
        """Steps ``start`` to ``end - 1`` counted as steps at the full size (each one, without a step cost)."""
        count = self.step_cost.trained(start, end) if self.step_cost is not None else float(end - start)
        return max(count, 1e-9) if end > start else 1.0

    def _at_cost(self, plan: Plan) -> Plan:
        """``plan`` (sized in steps at the full size) lengthened to the steps the time fits at their own cost."""
        if self.step_cost is None:
            return plan
        steps = steps_at_cost(self.step_cost, plan.steps_done, plan.planned_steps - plan.steps_done)
        validations = count_validations(plan.steps_done, steps, plan.val_every_steps) if plan.validations else 0
        return replace(plan, planned_steps=steps, validations=validations)

    def _replanned(self, trainer: L.Trainer) -> Plan:
        assert self.plan is not None
        plan, now = self.plan, _now(trainer)
        # The speed of the latest stretch of training (a shared machine's load drifts), unless it was too short to
        # time well (a validation soon after the last re-plan): then the plan's.
        steps, step_s = trainer.global_step - self._stretch[1], plan.seconds_per_step
        if steps >= self.probe_steps:
            step_s = (now - self._stretch[0] - self._paused_s) / self._full_steps(self._stretch[1], trainer.global_step)
        val_images, test_images = self._split_images(trainer)
        eval_s = self._eval_s_per_image or plan.eval_seconds_per_image
        if self._eval_step_s is None:  # a validation has just timed the evaluation at this stretch's speed
            self._eval_step_s = step_s
        # Under a step cost the step time moves with the cost model's error as well as the machine's load, so the
        # evaluation keeps its own measurement (the probe's at the full size, then each validation's).
        if self.step_cost is None:
            eval_s = drifted_eval_seconds(eval_s, self._eval_step_s, step_s)
        return self._at_cost(
            replan(
                plan,
                self.prior_s + now - self.started,
                step_s,
                eval_s,
                steps_done=trainer.global_step,
                val_images=val_images,
                test_images=test_images * self.test_passes,
                val_fixed_s=self._val_fixed_s,
            )
        )

    def _split_images(self, trainer: L.Trainer) -> tuple[int, int]:
        """Images one validation and the test evaluate on this rank."""
        data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at fit time, undeclared
        sizes = data.describe() if hasattr(data, "describe") else {}
        batch = int(getattr(data, "eval_batch_size", 1))
        world = trainer.world_size
        val = _images(int(sizes.get("val_size", 0)), trainer.limit_val_batches or 0, batch, world)
        test = _images(int(sizes.get("test_size", 0)), trainer.limit_test_batches or 0, batch, world)
        return val, test

    def summary(self, wall_s: float) -> dict[str, Any]:
        """What ``summary.json`` records of the budget: the plan, the rates of the last step, and the wall time
        (``wall_s``: this process's, given, plus what the runs it resumes spent)."""
        plan = self.plan
        return {
            "budget_s": self.budget_s,
            "planned_steps": plan.planned_steps if plan else None,
            "epochs": round(plan.epochs, 3) if plan else None,
            "seconds_per_step": round(plan.seconds_per_step, 5) if plan else None,
            "eval_seconds_per_image": round(plan.eval_seconds_per_image, 7) if plan else None,
            "spent_before_training_s": _rounded(self.spent_before_training_s),
            "image_size": self.image_size,
            "validations": plan.validations if plan else None,
            "replans": self.replans,
            "val_every_steps": plan.val_every_steps if plan else None,
            "planned_eval_s": round(plan.eval_s, 2) if plan else None,
            "margin_s": round(plan.margin_s, 2) if plan else None,
            "resumed_spent_s": round(self.prior_s, 2),
            "lr_end": self.lr_end,
            "wall_s": round(self.prior_s + wall_s, 2),  # the budget's clock: a resumed run's earlier time too
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def budget_planner(cfg: DictConfig, started: float) -> BudgetPlanner | None:
    """The planner of a run built from the ``cfg`` of :func:`~transfer.training.budget_config.budgeted_config`;
    ``None`` without a budget."""
    budget = parse_duration(cfg.get("budget"))
    if budget is None:
        return None
    return BudgetPlanner(budget, started, scheduler_config(cfg), test_passes=2 if cfg.get("tta") else 1)
