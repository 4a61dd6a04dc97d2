"""The config side of ``budget=<duration>``: the duration parsed, what cannot go with it refused, and the run's config
rewritten into the open-ended run the planner (:mod:`transfer.training.budget`) then plans.

Nothing here imports Lightning (torch comes in through the size rule): the preflight checks a budget before the
trainer and its callbacks are loaded.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from transfer.core.errors import ConfigError
from transfer.training.budget_recipe import apply_budget_size

# Until the plan, the run is open-ended: no epoch limit, and a schedule this long (its start is what the probe
# steps train on; it is rebuilt over the planned length once the probe has run).
PROVISIONAL_STEPS = 10**7
_LENGTH_KEYS = ("total_steps", "T_max")  # the length argument of the per-step schedules the project has
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value: Any) -> float | None:
    """Seconds of a ``budget=`` value: ``90s``, ``15m``, ``2h``, ``1h30m`` or a plain number of seconds.

    Args:
        value: the setting (``None``: no budget).

    Returns:
        The seconds, or ``None`` for ``None``.

    Raises:
        ConfigError: anything else, or a duration that is not positive.
    """
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(text)
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and match:
            hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
            seconds = 3600 * hours + 60 * minutes + secs
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"budget={value!r} is not a wall-clock budget: write a positive duration such as budget=90s, "
            f"budget=15m, budget=2h or budget=1h30m (a plain number is seconds), or budget=null to train "
            f"trainer.max_epochs epochs."
        )
    return seconds


def length_key(scheduler: dict[str, Any] | None) -> str | None:
    """The scheduler argument that is its length in steps (``total_steps``, ``T_max``), if it has one."""
    return next((key for key in _LENGTH_KEYS if key in (scheduler or {})), None)


def scheduler_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``scheduler`` group as a plain dict, resolved; ``None`` for constant rates (``scheduler=none``)."""
    node = cfg.get("scheduler")
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else None
    return {str(k): v for k, v in container.items()} if isinstance(container, dict) and container else None


def budget_problems(cfg: DictConfig) -> list[str]:
    """What makes ``budget=`` unusable with the rest of ``cfg``, as phrases for the preflight's one paragraph."""
    try:
        budget = parse_duration(OmegaConf.select(cfg, "budget", default=None))
    except ConfigError as err:
        return [str(err).rstrip(".")]
    if budget is None:
        return []
    found = []
    scheduler = scheduler_config(cfg)
    target = str((scheduler or {}).get("_target_", ""))
    if "Plateau" in target or (scheduler or {}).get("monitor"):
        found.append(
            f"budget={cfg.budget} needs a per-step schedule it can plan to end at the budget, and "
            f"scheduler={target.rsplit('.', 1)[-1]} steps per epoch on a validation metric: use scheduler=onecycle, "
            f"warmup_cosine, cosine or none with a budget"
        )
    elif scheduler and target and length_key(scheduler) is None:
        found.append(
            f"budget={cfg.budget} plans the schedule's length, and scheduler {target} has none of the arguments "
            f"{', '.join(_LENGTH_KEYS)}: use scheduler=onecycle, warmup_cosine, cosine or none with a budget"
        )
    if OmegaConf.select(cfg, "finetune.cache_features"):
        found.append(
            f"budget={cfg.budget} times the first training steps, and finetune.cache_features=true makes the "
            f"frozen epochs' steps far faster than the rest: drop finetune.cache_features with a budget"
        )
    return found


def budgeted_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` as a budgeted run is built from it: ``cfg`` itself without a budget.

    With one, a copy whose trainer runs open-ended until the plan (no epoch limit, :data:`PROVISIONAL_STEPS`,
    validation by steps and none before the probe's), whose schedule runs per step over a provisional length, and
    whose input size is the one measured best at the budget where the user left it to the model
    (:func:`~transfer.training.budget_recipe.apply_budget_size`).
    """
    budget = parse_duration(cfg.get("budget"))
    if budget is None:
        return cfg
    run = copy.deepcopy(cfg)
    apply_budget_size(run, budget)
    with open_dict(run):
        trainer = run.trainer
        trainer.max_epochs, trainer.max_steps = -1, PROVISIONAL_STEPS
        trainer.check_val_every_n_epoch, trainer.val_check_interval = None, PROVISIONAL_STEPS
        # The eval probe times the validation's forward pass instead (2 batches of a 2-minute budget saved).
        trainer.num_sanity_val_steps = 0
        if run.get("scheduler"):
            scheduler = scheduler_config(run) or {}
            run.scheduler = {**scheduler, str(length_key(scheduler)): PROVISIONAL_STEPS, "interval": "step"}
    return run
