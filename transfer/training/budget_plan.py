"""The arithmetic of a budgeted run's plan: pure functions of measured times, tested with made-up numbers.

:func:`make_plan` sizes a run after its probe; :func:`replan` sizes what is left of it again at each validation,
from the speed the run has kept since the plan (a probe of twenty steps misjudges a shared machine's speed by as
much as a fifth; every validation is a longer and later measurement).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from transfer.core.errors import ConfigError

MAX_VALIDATIONS = 4  # validations in a run (one more when the last step falls between two of them)
# Writing outputs (checkpoint load for the test, summary, figures) gets a fixed margin, not a measured one:
# 1.5 s plus 1% of the budget (epoch boundaries the probe did not see land in it too).
MARGIN_FIXED_S, MARGIN_FRACTION = 1.5, 0.01
# The validations of a budgeted run take at most this share of the budget; past it each one scores a subset of
# whole eval batches. Under a one-cycle schedule the last step's weights are the best ones, so a validation
# selects little, and a full CIFAR-10 validation was 8% of a 2-minute budget (docs/recipe.md "Budget").
VALIDATION_SHARE = 0.02
# ...but never fewer images than this (an accuracy on 1024 images has a standard error under 1.6 points): a small
# photo set's validation stays whole.
MIN_VALIDATION_IMAGES = 1024


def output_margin(budget_s: float) -> float:
    """The fixed time kept for writing outputs: :data:`MARGIN_FIXED_S` plus :data:`MARGIN_FRACTION` of the budget."""
    return MARGIN_FIXED_S + MARGIN_FRACTION * budget_s


@dataclass(frozen=True)
class Plan:
    """A budgeted run's plan (all times in seconds).

    Attributes:
        budget_s: the budget.
        planned_steps: optimizer steps of the whole run (those trained before the plan included).
        steps_done: optimizer steps trained when it was planned (the probe, and those of a resumed checkpoint).
        val_every_steps: a validation every this many steps (and one at the last step).
        validations: validations still to come when it was planned.
        seconds_per_step: measured time per optimizer step (at the full input size, under progressive resizing).
        eval_seconds_per_image: measured time per evaluated image.
        steps_per_epoch: optimizer steps per epoch.
        spent_s: wall time spent when it was planned (from the process start; earlier runs' time on resume).
        eval_s: planned time for the validations and the test.
        margin_s: the margin kept for writing outputs.
        val_batches: eval batches each validation scores (:data:`VALIDATION_SHARE`); ``None``: the whole split.
    """

    budget_s: float
    planned_steps: int
    steps_done: int
    val_every_steps: int
    validations: int
    seconds_per_step: float
    eval_seconds_per_image: float
    steps_per_epoch: float
    spent_s: float
    eval_s: float
    margin_s: float
    val_batches: int | None = None

    @property
    def epochs(self) -> float:
        """The planned length in epochs (the last one may end early)."""
        return self.planned_steps / self.steps_per_epoch


def validation_interval(steps: int, steps_per_epoch: float) -> int:
    """Steps between validations: every epoch when the run has at most :data:`MAX_VALIDATIONS` epochs, else
    spread so that there are at most that many."""
    if steps <= MAX_VALIDATIONS * steps_per_epoch:
        return max(1, round(steps_per_epoch))
    return max(1, math.ceil(steps / MAX_VALIDATIONS))


def count_validations(done: int, total: int, every: int) -> int:
    """Validations after step ``done`` up to ``total``: each multiple of ``every``, and one at ``total``."""
    return total // every - done // every + (0 if total % every == 0 else 1)


def validation_batches(
    budget_s: float, validations: int, val_s: float, eval_batch_size: int, eval_seconds_per_image: float
) -> int | None:
    """Eval batches per validation that keep ``validations`` within :data:`VALIDATION_SHARE` of the budget, and
    :data:`MIN_VALIDATION_IMAGES` at least; ``None`` when the whole split (``val_s`` per validation) fits."""
    allowed = VALIDATION_SHARE * budget_s
    if validations == 0 or validations * val_s <= allowed or eval_batch_size <= 0 or eval_seconds_per_image <= 0:
        return None
    fitting = math.floor(allowed / validations / (eval_batch_size * eval_seconds_per_image))
    return max(1, fitting, math.ceil(MIN_VALIDATION_IMAGES / eval_batch_size))


def _settle(
    available: float,
    val_s: float,
    seconds_per_step: float,
    steps_done: int,
    validations: int,
    interval: Callable[[int], int],
) -> tuple[int, int, int]:
    """Steps, validation interval and validations that fit ``available`` seconds together: each depends on the
    others, and a few rounds from the guess ``validations`` settle them."""
    steps, every = 0, 1
    for _ in range(4):
        steps = math.floor((available - validations * val_s) / seconds_per_step)
        every = interval(max(steps, 1))
        settled = count_validations(steps_done, steps_done + max(steps, 1), every)
        if settled == validations:
            break
        validations = settled
    return steps, every, validations


def _no_time(
    budget_s: float,
    spent_s: float,
    seconds_per_step: float,
    steps_done: int,
    validation: tuple[float, int],
    test_s: float,
    margin: float,
) -> ConfigError:
    """The refusal of a budget that cannot fit one more step, naming the minimum that would."""
    val_s, val_images = validation
    minimum = (spent_s + seconds_per_step + val_s + test_s + MARGIN_FIXED_S) / (1 - MARGIN_FRACTION)
    return ConfigError(
        f"budget={budget_s:g}s leaves no time to train: by this run's own measurements it needs at least "
        f"{math.ceil(minimum)} s to train one more step ({spent_s:.1f} s already spent on start-up, data, the "
        f"model and {steps_done} steps; {seconds_per_step:.3g} s per step; {val_s:.2f} s per validation of "
        f"{val_images} images; {test_s:.2f} s for the test; {margin:.1f} s kept for writing outputs). Pass "
        f"budget={math.ceil(minimum)}s or more, or budget=null to train trainer.max_epochs epochs."
    )


def make_plan(
    budget_s: float,
    spent_s: float,
    seconds_per_step: float,
    eval_seconds_per_image: float,
    *,
    steps_done: int,
    steps_per_epoch: float,
    val_images: int,
    test_images: int,
    eval_batch_size: int = 0,
) -> Plan:
    """Size the rest of a run to the budget: ``(budget - spent - validations - test - margin) / seconds per step``.

    Args:
        budget_s: the budget.
        spent_s: wall time already spent (start-up, data, model, the probe; earlier runs' on resume).
        seconds_per_step: measured time per optimizer step.
        eval_seconds_per_image: measured time per evaluated image.
        steps_done: optimizer steps already trained.
        steps_per_epoch: optimizer steps per epoch.
        val_images: images one validation evaluates (on this rank).
        test_images: image evaluations of the final test (on this rank; twice the images with flip TTA).
        eval_batch_size: images per eval batch: with it, validations past :data:`VALIDATION_SHARE` of the budget
            score fewer batches (``Plan.val_batches``); 0: always the whole split.

    Returns:
        The plan.

    Raises:
        ConfigError: the budget cannot fit even one more step (and a validation, where there is a split to
            validate on); the message names the minimum.
    """
    margin = output_margin(budget_s)
    val_s, test_s = val_images * eval_seconds_per_image, test_images * eval_seconds_per_image
    available = budget_s - spent_s - test_s - margin

    def settle(val_s: float, validations: int) -> tuple[int, int, int]:
        return _settle(
            available, val_s, seconds_per_step, steps_done, validations,
            lambda steps: validation_interval(steps, steps_per_epoch),
        )  # fmt: skip

    steps, every, validations = settle(val_s, MAX_VALIDATIONS + 1)
    val_batches = validation_batches(budget_s, validations, val_s, eval_batch_size, eval_seconds_per_image)
    if val_batches is not None and val_batches * eval_batch_size < val_images:
        val_images = val_batches * eval_batch_size
        val_s = val_images * eval_seconds_per_image
        steps, every, validations = settle(val_s, validations)
    else:
        val_batches = None
    if steps < 1:
        raise _no_time(budget_s, spent_s, seconds_per_step, steps_done, (val_s, val_images), test_s, margin)
    return Plan(
        budget_s=budget_s,
        planned_steps=steps_done + steps,
        steps_done=steps_done,
        val_every_steps=every,
        validations=validations if val_images else 0,  # data.train_on_val: no split to validate on
        seconds_per_step=seconds_per_step,
        eval_seconds_per_image=eval_seconds_per_image,
        steps_per_epoch=steps_per_epoch,
        spent_s=spent_s,
        eval_s=validations * val_s + test_s,
        margin_s=margin,
        val_batches=val_batches,
    )


def replan(
    plan: Plan,
    spent_s: float,
    seconds_per_step: float,
    eval_seconds_per_image: float,
    *,
    steps_done: int,
    val_images: int,
    test_images: int,
    val_fixed_s: float = 0.0,
) -> Plan:
    """Size what is left of a planned run again, keeping its validation interval.

    Args:
        plan: the plan the run follows.
        spent_s: wall time spent so far.
        seconds_per_step: the training speed measured since the plan (validations left out).
        eval_seconds_per_image: the latest validation's time per image.
        steps_done: optimizer steps trained.
        val_images: images one validation evaluates.
        test_images: image evaluations of the final test.
        val_fixed_s: what a validation costs besides scoring its images (the checkpoint it writes): per validation,
            as a small split's few images would otherwise carry it as a cost per image, the test's too.

    Returns:
        The new plan; at least one more step (a run past its budget stops at the next one, it does not fail).
    """
    val_s = val_images * eval_seconds_per_image + (val_fixed_s if val_images else 0.0)
    test_s = test_images * eval_seconds_per_image
    available = plan.budget_s - spent_s - test_s - plan.margin_s
    guess = count_validations(steps_done, plan.planned_steps, plan.val_every_steps)
    steps, _, validations = _settle(
        available, val_s, seconds_per_step, steps_done, guess, lambda steps: plan.val_every_steps
    )
    steps = max(1, steps)
    return replace(
        plan,
        planned_steps=steps_done + steps,
        steps_done=steps_done,
        validations=validations if val_images else 0,
        seconds_per_step=seconds_per_step,
        eval_seconds_per_image=eval_seconds_per_image,
        spent_s=spent_s,
        eval_s=validations * val_s + test_s,
    )


def drifted_eval_seconds(eval_seconds_per_image: float, measured_step_s: float, step_s: float) -> float:
    """An evaluation's time per image now: the one measured when a training step took ``measured_step_s``, scaled
    by how the step time has moved since.

    A shared machine's load slows training and evaluation alike, and a run with one validation re-measures its
    evaluation only at the end: a 4-minute CIFAR-10 run at 80 px whose steps went from 0.46 to 0.61 s tested 1.3x
    slower than its probe had timed, and ended 7.8% over its budget.
    """
    if measured_step_s <= 0 or step_s <= 0:
        return eval_seconds_per_image
    return eval_seconds_per_image * step_s / measured_step_s


def describe_plan(plan: Plan) -> str:
    """One line for the log: the plan and what it is made of."""
    scored = "" if plan.val_batches is None else f", {plan.val_batches} batches each"
    validations = (
        f"{plan.validations} validations (every {plan.val_every_steps} steps{scored})"
        if plan.validations
        else "no validation"
    )
    return (
        f"budget {plan.budget_s:g} s: {plan.planned_steps} steps ({plan.epochs:.2f} epochs) at "
        f"{plan.seconds_per_step:.4g} s/step, {validations} and the test planned at {plan.eval_s:.1f} s, "
        f"{plan.spent_s:.1f} s spent so far, "
        f"{plan.margin_s:.1f} s kept for the outputs"
    )


class StepCost(Protocol):
    """The cost of training steps relative to a step at the full input size (1.0), for a run whose steps change
    cost on a schedule of its plan (progressive resizing: a step's compute grows with its pixel count)."""

    def trained(self, start: int, end: int) -> float:
        """Summed relative cost of the steps ``start`` to ``end - 1``, as trained."""
        ...

    def ahead(self, done: int, planned: int) -> float:
        """Summed relative cost of the steps ``done`` to ``planned - 1`` under a plan of ``planned`` steps."""
        ...


def steps_at_cost(cost: StepCost, done: int, full_steps: int) -> int:
    """The planned length whose steps after ``done`` cost what ``full_steps`` steps at the full size cost.

    Args:
        cost: the run's step costs.
        done: steps trained.
        full_steps: steps at the full size the time left fits (what :func:`make_plan` sized).

    Returns:
        The largest planned length (``done + full_steps`` at least) whose steps ahead fit, found by bisection:
        the cost ahead grows with the planned length (a longer plan adds steps and reaches each size later).
    """
    low, high = done + full_steps, done + 2 * max(1, full_steps)
    while cost.ahead(done, high) <= full_steps:  # cheaper steps than the full size: more of them fit
        low, high = high, done + 2 * (high - done)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost.ahead(done, middle) <= full_steps else (low, middle)
    return low
