"""What a budget chooses besides the schedule's length: the input size measured best at that budget.

A longer budget buys more epochs, and past a point a larger input is worth more than further epochs at the small
one: on CIFAR-10 Lite0 upsampled to 80 px beat the default 64 px from 4 minutes on
(docs/recipe.md#resolution-at-a-budget). The choice is a table of measured cells, consulted only where the user
left the size to the model (``data.image_size=null``, ``model.adapt=auto``); a cell that was not measured keeps
the model's own size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer.training.compute import uses_gpu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeRule:
    """One measured cell of the table: at budgets of ``from_budget_s`` or more, ``model`` on data whose own side is
    ``native_size`` px is fed ``image_size`` px.

    Attributes:
        model: registry name (``model.name``).
        native_size: the data's own side (32: CIFAR-10); photos of any size have none and no rule.
        from_budget_s: the smallest budget (seconds) the rule applies at.
        image_size: the input side it chooses.
    """

    model: str
    native_size: int
    from_budget_s: float
    image_size: int


# Measured on the 2-core CPU (Lite0 trained 64 px at 144-420 images/s on the days of the runs): 80 px against 64 px
# was 85.94/88.00/90.08% against 83.68/87.24/88.99% at 4/8/15 minutes (83.05 against 81.32% at 4 on a slower day),
# and 70.40/70.71% against 69.69/73.24% at 2, where its fewer steps are worth more than their size
# (docs/recipe.md#resolution-at-a-budget). Photos have no rule: on the clothing photos at 5 minutes 128, 160 and 224 px
# (and Lite1/Lite2 at 128) tested within 6 photos of 372 of each other (docs/recipe.md, the photos' size and backbone).
CPU_SIZE_RULES: tuple[SizeRule, ...] = (SizeRule("efficientnet_lite0", 32, 240.0, 80),)


def budget_image_size(
    model: str, native_size: int | None, budget_s: float, gpu: bool, rules: tuple[SizeRule, ...] = CPU_SIZE_RULES
) -> int | None:
    """The input side the measured table chooses for a budget, or ``None`` where it has no cell.

    Args:
        model: registry name.
        native_size: the data's own side, ``None`` for photos of any size.
        budget_s: the budget in seconds.
        gpu: whether the run trains on a GPU (the table was measured on a CPU, so a GPU keeps the model's size).
        rules: the table.

    Returns:
        The side of the rule with the largest ``from_budget_s`` at or below ``budget_s``, or ``None``.
    """
    if gpu or native_size is None:
        return None
    fitting = [r for r in rules if r.model == model and r.native_size == native_size and budget_s >= r.from_budget_s]
    return max(fitting, key=lambda r: r.from_budget_s).image_size if fitting else None


def apply_budget_size(cfg: DictConfig, budget_s: float) -> int | None:
    """Set ``cfg.data.image_size`` (in place) to what :func:`budget_image_size` chooses, where the user left it to
    the model, and log the choice.

    Args:
        cfg: a composed config with ``model``, ``data`` and ``trainer`` groups (a budgeted run's copy).
        budget_s: the budget in seconds.

    Returns:
        The side set, or ``None`` when the config keeps what it had.
    """
    data, model = cfg.get("data"), cfg.get("model")
    if data is None or model is None or data.get("image_size") is not None or model.get("adapt", "auto") != "auto":
        return None
    native = getattr(get_class(data._target_), "native_size", None)
    gpu = uses_gpu(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    size = budget_image_size(str(model.name), native, budget_s, gpu)
    if size is None:
        return None
    with open_dict(cfg):
        cfg.data.image_size = size
    log.info(
        "budget=%s on a CPU: %s at %d px, the size measured best on %d px data at this budget "
        "(docs/recipe.md#resolution-at-a-budget); pass data.image_size=<px> to choose another",
        cfg.get("budget"),
        cfg.model.name,
        size,
        native,
    )
    return size
