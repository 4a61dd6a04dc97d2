"""Optimizer and lr scheduler from the ``optimizer`` and ``scheduler`` config groups."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class
from torch.optim import Optimizer

from transfer.errors import ConfigError

# Keys of the scheduler group that Lightning reads; the rest are the scheduler's own arguments.
_LIGHTNING_KEYS = ("monitor", "interval", "frequency")


def _cls(target: str, group: str) -> type:
    try:
        return get_class(target)
    except Exception as err:  # hydra raises ImportError or ValueError depending on which part is wrong
        raise ConfigError(f"{group}._target_={target!r} cannot be imported ({err}). Use a class path such as "
                          f"torch.optim.AdamW, or pick a file from conf/{group}/.") from err


def build_optimizer(cfg: Mapping[str, Any], param_groups: list[dict[str, Any]]) -> Optimizer:
    """Instantiate ``cfg['_target_']`` over ``param_groups`` with the remaining keys as arguments.

    Args:
        cfg: the ``optimizer`` config (``_target_``, ``lr``, ...).
        param_groups: torch param groups.

    Returns:
        The optimizer.
    """
    args = dict(cfg)
    cls = _cls(args.pop("_target_"), "optimizer")
    try:
        return cls(param_groups, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer {cls.__name__} rejected its settings {args}: {err}") from err


def build_scheduler(cfg: Mapping[str, Any] | None, optimizer: Optimizer) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` config dict, or ``None`` for constant learning rates.

    Args:
        cfg: the ``scheduler`` config: ``_target_`` and its arguments, plus Lightning's ``monitor``,
            ``interval`` (``epoch`` or ``step``) and ``frequency``.
        optimizer: the optimizer to schedule.

    Returns:
        ``{"scheduler": ..., "interval": ..., ...}`` or ``None``.
    """
    args = dict(cfg or {})
    target = args.pop("_target_", None)
    if not target:
        return None
    lightning = {k: args.pop(k) for k in _LIGHTNING_KEYS if k in args}
    cls = _cls(target, "scheduler")
    try:
        scheduler = cls(optimizer, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler {cls.__name__} rejected its settings {args}: {err}") from err
    return {"scheduler": scheduler, "interval": lightning.get("interval", "epoch"),
            "frequency": lightning.get("frequency", 1),
            **({"monitor": lightning["monitor"]} if "monitor" in lightning else {})}
