"""Optimizer and lr scheduler from the ``optimizer`` and ``scheduler`` config groups.

Both groups are plain Hydra ``_target_`` configs: the optimizer is instantiated as a partial and called with the
model's param groups, the scheduler likewise with the optimizer. The scheduler group may carry Lightning's own
keys (``interval``, ``frequency``, ``monitor``) beside its arguments; they are split off here. A per-step
schedule that needs its length (``total_steps: null``) gets it from the trainer (``estimated_stepping_batches``:
epochs x batches per epoch, ``limit_train_batches`` and gradient accumulation included), never by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from transfer.core.errors import ConfigError

# Keys of the scheduler group that Lightning reads; the rest are the scheduler's own arguments.
_LIGHTNING_KEYS = ("monitor", "interval", "frequency")


def _partial(cfg: Mapping[str, Any], group: str) -> Any:
    try:
        return instantiate({**cfg, "_partial_": True})
    except InstantiationException as err:
        raise ConfigError(
            f"{group}._target_={cfg.get('_target_')!r} cannot be built ({err}). Use a class path "
            f"such as torch.optim.AdamW, or pick a file from conf/{group}/."
        ) from err


def build_optimizer(cfg: Mapping[str, Any], param_groups: list[dict[str, Any]]) -> Optimizer:
    """Instantiate the ``optimizer`` config over ``param_groups``.

    Args:
        cfg: the ``optimizer`` config (``_target_``, ``lr``, ...).
        param_groups: torch param groups.

    Returns:
        The optimizer.
    """
    args = dict(cfg)
    if args.get("lr", 1.0) <= 0 or args.get("weight_decay", 0.0) < 0:
        raise ConfigError(
            f"optimizer.lr={args.get('lr')} and optimizer.weight_decay={args.get('weight_decay')}: the "
            f"learning rate must be positive and the weight decay not negative."
        )
    try:
        return _partial(args, "optimizer")(param_groups)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer {args.get('_target_')} rejected its settings {args}: {err}") from err


def build_scheduler(
    cfg: Mapping[str, Any] | None, optimizer: Optimizer, total_steps: float | None = None
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` config dict, or ``None`` for constant learning rates.

    Args:
        cfg: the ``scheduler`` config: ``_target_`` and its arguments, plus Lightning's ``monitor``,
            ``interval`` (``epoch`` or ``step``) and ``frequency``. ``total_steps: null`` asks for the run's
            length in optimizer steps.
        optimizer: the optimizer to schedule.
        total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).

    Returns:
        ``{"scheduler": ..., "interval": ..., ...}`` or ``None``.
    """
    args = dict(cfg or {})
    if not args.get("_target_"):
        return None
    lightning = {k: args.pop(k) for k in _LIGHTNING_KEYS if k in args}
    if "total_steps" in args and args["total_steps"] is None:
        if total_steps is None or not math.isfinite(total_steps):
            raise ConfigError(
                f"scheduler {args['_target_']} runs per step and needs the run's length: set "
                f"trainer.max_epochs (trainer.max_time alone does not say how many steps there are)."
            )
        args["total_steps"] = int(total_steps)
    try:
        scheduler = _partial(args, "scheduler")(optimizer)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler {args['_target_']} rejected its settings {args}: {err}") from err
    return {
        "scheduler": scheduler,
        "interval": lightning.get("interval", "epoch"),
        "frequency": lightning.get("frequency", 1),
        **({"monitor": lightning["monitor"]} if "monitor" in lightning else {}),
    }


class WarmupCosine(LRScheduler):
    """Linear warm-up from 0 to each group's lr over ``warmup`` of the steps, then cosine decay to
    ``final_ratio`` x lr at ``total_steps``: timm's and most fine-tuning recipes' per-step schedule.

    Every param group follows the same curve from its own peak (``base_lrs``), so a group added later (the
    backbone at the unfreeze) only needs its peak appended there.

    Args:
        optimizer: the optimizer.
        total_steps: length of the schedule in optimizer steps.
        warmup: fraction of ``total_steps`` spent warming up.
        final_ratio: lr at the end as a fraction of the peak.
        last_epoch: the step to resume from (``-1`` for a fresh start).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup: float = 0.05,
        final_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1 or not 0 <= warmup < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1 and warmup={warmup} in [0, 1)")
        self.total_steps, self.warmup_steps, self.final_ratio = total_steps, int(warmup * total_steps), final_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The lr multiplier at ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        scale = self.factor(self.last_epoch)
        return [base * scale for base in self.base_lrs]
