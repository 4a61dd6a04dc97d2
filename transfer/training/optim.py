"""Optimizer and lr scheduler from the ``optimizer`` and ``scheduler`` config groups.

Both groups are plain Hydra ``_target_`` configs: the optimizer is instantiated as a partial and called with the
model's param groups (:mod:`transfer.training.param_groups`), the scheduler likewise with the optimizer. The
scheduler group may carry Lightning's own keys (``interval``, ``frequency``, ``monitor``) beside its arguments;
they are split off here. A per-step schedule that needs its length (``total_steps: null``) gets it from the
trainer (``estimated_stepping_batches``: epochs x batches per epoch, ``limit_train_batches`` and gradient
accumulation included), never by hand.

Every group is scheduled from the first step, the backbone's too while it is frozen: the scheduler is built over
all groups and wrapped in a :class:`FreezeGate`, which holds a group's lr at 0 until its ``trains_from`` epoch.
One mechanism for every schedule (one-cycle, warm-up cosine, cosine, plateau, and none, which becomes a constant
schedule when some group is frozen): the wrapped scheduler always sees and updates the rates its schedule gives,
so a group that joins late comes in at the rate the schedule has reached, and a plateau's reductions act on it
while it waits.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any, cast

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from transfer.core.errors import ConfigError
from transfer.training.param_groups import frozen_at

# Keys of the scheduler group that Lightning reads; the rest are the scheduler's own arguments.
_LIGHTNING_KEYS = ("monitor", "interval", "frequency")
# Optimizer settings a resumed run does not reset on its restored groups: the rate has its own rule, and the
# kernel (``fused``) is chosen before the state is restored, which it must match (Classifier.on_load_checkpoint).
_NOT_RESETTABLE = ("_target_", "lr", "fused")
# Scheduler arguments that are rates per param group (OneCycleLR's and CyclicLR's): given as one number they are
# the head's, and each group gets its own share of it (its ``lr_scale``), as its lr is.
_PER_GROUP_RATES = ("max_lr", "base_lr")


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
        cfg: the ``optimizer`` config (``_target_``, ``lr``, ...), as :func:`optimizer_settings` gives it.
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
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: e.g. fused and foreach both true
        raise ConfigError(f"optimizer {args.get('_target_')} rejected its settings {args}: {err}") from err


def optimizer_settings(cfg: Mapping[str, Any], clips_in_mixed_precision: bool = False) -> dict[str, Any]:
    """The ``optimizer`` config a run builds: as given, but unfused where the trainer cannot step a fused kernel.

    ``fused`` is a choice of kernel, not of update, so it is dropped where it cannot apply: for an optimizer class
    without one (``optimizer._target_=torch.optim.RMSprop`` beside adamw.yaml's keys), and where the trainer clips
    gradients under a mixed-precision plugin, which Lightning does only after unscaling them itself: it refuses an
    optimizer that unscales inside its step, as a fused one does. Such a run steps unfused, the same update by a
    slower kernel.

    Args:
        cfg: the ``optimizer`` config group.
        clips_in_mixed_precision: the trainer clips gradients (``gradient_clip_val``) in mixed precision.
    """
    args = dict(cfg)
    if "fused" in args and not _takes_fused(args.get("_target_")):
        args.pop("fused")
    if clips_in_mixed_precision and args.get("fused"):
        args["fused"] = False  # the run's optimizer log line says so (Classifier.configure_optimizers)
    return args


def _takes_fused(target: Any) -> bool:
    """Whether the optimizer class ``target`` names has a ``fused`` argument (an unknown one: leave it to build)."""
    module, _, name = str(target).rpartition(".")
    try:
        return "fused" in inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return True


def optimizer_lr(cfg: Mapping[str, Any]) -> float:
    """``optimizer.lr``: the head's rate, which every param group's is scaled from.

    Raises:
        ConfigError: it is missing or not a positive number.
    """
    lr = cfg.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(
            f"optimizer.lr={lr!r}: set a positive learning rate (e.g. optimizer.lr=1e-3); the head trains at it "
            f"and the backbone's groups at finetune.backbone_lr_ratio x it."
        )
    return float(lr)


def build_scheduler(
    cfg: Mapping[str, Any] | None, optimizer: Optimizer, total_steps: float | None = None
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` config dict, or ``None`` for constant learning rates with nothing frozen.

    Args:
        cfg: the ``scheduler`` config: ``_target_`` (an lr scheduler class) and its arguments, plus Lightning's
            ``monitor``, ``interval`` (``epoch`` or ``step``) and ``frequency``. ``total_steps: null`` asks for the
            run's length in optimizer steps.
        optimizer: the optimizer to schedule, its groups as :func:`~transfer.training.param_groups.build_param_groups`
            made them (``lr_scale``, ``trains_from``).
        total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).

    Returns:
        ``{"scheduler": <a FreezeGate>, "interval": ..., ...}`` or ``None``.
    """
    args = dict(cfg or {})
    if not args.get("_target_"):
        if not any(frozen_at(0, g.get("trains_from", 0)) for g in optimizer.param_groups):
            return None
        # Constant rates, but a frozen group's must still read 0 until it trains: the same gate as any schedule.
        return {"scheduler": gated(LambdaLR)(optimizer, lr_lambda=_constant), "interval": "epoch", "frequency": 1}
    lightning = {k: args.pop(k) for k in _LIGHTNING_KEYS if k in args}
    if "total_steps" in args and args["total_steps"] is None:
        if total_steps is None or not math.isfinite(total_steps):
            raise ConfigError(
                f"scheduler {args['_target_']} runs per step and needs the run's length: set "
                f"trainer.max_epochs (trainer.max_time alone does not say how many steps there are)."
            )
        args["total_steps"] = int(total_steps)
    scheduler = _gated_scheduler(args, optimizer)
    return {
        "scheduler": scheduler,
        "interval": lightning.get("interval", "epoch"),
        "frequency": lightning.get("frequency", 1),
        **({"monitor": lightning["monitor"]} if "monitor" in lightning else {}),
    }


def _gated_scheduler(args: dict[str, Any], optimizer: Optimizer) -> FreezeGate:
    """The scheduler ``args`` names (``_target_`` and its own arguments), gated, over ``optimizer``'s groups."""
    scales = [float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    per_group: dict[str, Any] = {}  # passed beside the partial: Hydra would turn lists into ListConfigs
    for key in _PER_GROUP_RATES:
        if key in args:
            rate = args.pop(key)
            per_group[key] = [rate * scale for scale in scales] if isinstance(rate, (int, float)) else rate
    factory = _partial(args, "scheduler")
    cls = getattr(factory, "func", None)
    if not (isinstance(cls, type) and issubclass(cls, LRScheduler)):
        raise ConfigError(
            f"scheduler._target_={args['_target_']!r} is not an lr scheduler class. Name one such as "
            f"torch.optim.lr_scheduler.OneCycleLR, or pick a file from conf/scheduler/."
        )
    try:
        return gated(cls)(optimizer, *factory.args, **factory.keywords, **per_group)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler {args['_target_']} rejected its settings {args}: {err}") from err


def _constant(step: int) -> float:
    return 1.0


class FreezeGate(LRScheduler):
    """Mixed into an lr scheduler class by :func:`gated`: each param group's lr is the schedule's times a
    multiplier that is 0 while the group is frozen (before its ``trains_from`` epoch) and 1 after.

    The schedule's own rate of each group is kept in the group as ``scheduled_lr`` and put back into ``lr``
    around every step of the wrapped scheduler, so schedules that read the current lr (cosine's recursive form,
    a plateau's reductions) never see the gate's zeros. The finetuning callback tells the gate the epoch
    (:meth:`set_epoch`) at each epoch start; the optimizer state saves both keys, the scheduler state the epoch.
    """

    gate_epoch: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.gate_epoch = 0
        super().__init__(*args, **kwargs)
        self._release()  # ReduceLROnPlateau's constructor takes no step, the others' do: settle both alike
        self._close()

    def step(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped scheduler's step on the schedule's own rates, then the gate."""
        self._release()
        super().step(*args, **kwargs)
        self._close()

    def set_epoch(self, epoch: int) -> None:
        """Open the gate of the groups that train in ``epoch`` (and close it on those that do not)."""
        self._release()
        self.gate_epoch = epoch
        self._close()

    def get_last_lr(self) -> list[Any]:
        """The rates the optimizer uses now (0 for a frozen group)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def _release(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("scheduled_lr", group["lr"])

    def _close(self) -> None:
        for group in self.optimizer.param_groups:
            group["scheduled_lr"] = group["lr"]
            if frozen_at(self.gate_epoch, group.get("trains_from", 0)):
                group["lr"] = 0.0


_GATED: dict[type[LRScheduler], type[FreezeGate]] = {}


def gated(cls: type[LRScheduler]) -> type[FreezeGate]:
    """``cls`` with a :class:`FreezeGate`: still an instance of ``cls`` (Lightning's plateau handling and the
    resume code check ``isinstance``), with the same arguments and state. One class per ``cls``."""
    if issubclass(cls, FreezeGate):
        return cls
    if cls not in _GATED:
        made = type(f"Gated{cls.__name__}", (FreezeGate, cls), {"__module__": __name__})
        _GATED[cls] = cast(type[FreezeGate], made)
    return _GATED[cls]


class WarmupCosine(LRScheduler):
    """Linear warm-up from 0 to each group's lr over ``warmup`` of the steps, then cosine decay to
    ``final_ratio`` x lr at ``total_steps``: timm's and most fine-tuning recipes' per-step schedule.

    Every param group follows the same curve from its own peak (its lr when the schedule starts).

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

    def get_lr(self) -> list[float | Tensor]:
        scale = self.factor(self.last_epoch)
        return [base * scale for base in self.base_lrs]


def replan(
    optimizer: Optimizer,
    configs: list[Any],
    settings: Mapping[str, Any],
    saved: Mapping[str, Any],
    total_steps: float | None,
) -> str | None:
    """Make a resumed run's restored optimizer and lr schedule follow this run's settings.

    Lightning restores the optimizer's param groups (their ``lr`` and other settings) and the scheduler's state
    (its length and peak rates) from the checkpoint, over whatever this run configured. Here, when the optimizer
    or scheduler settings or the run's length differ from the checkpoint's, the groups take this run's settings
    (each group's rate is ``optimizer.lr`` x its ``lr_scale``; the optimizer's moments are kept) and every
    schedule is rebuilt from this run's config and advanced to the step it had reached, so it continues from
    there towards the new end. A plateau schedule keeps its reductions: its rates are rescaled by the new lr's
    ratio to the old.

    Args:
        optimizer: the restored optimizer.
        configs: the trainer's ``lr_scheduler_configs`` (their ``scheduler`` is replaced).
        settings: this run's ``{"optimizer": ..., "scheduler": ...}`` config groups.
        saved: the checkpoint's groups, the same keys.
        total_steps: this run's optimizer steps (``trainer.estimated_stepping_batches``).

    Returns:
        What was re-planned, for the log, or ``None`` when the checkpoint's settings are this run's.
    """
    total = int(total_steps) if total_steps is not None and math.isfinite(total_steps) else None
    lengths = {getattr(c.scheduler, "total_steps", None) for c in configs} - {None}
    longer = total is not None and any(n != total for n in lengths)
    same = all(saved.get(k) == settings.get(k) for k in ("optimizer", "scheduler"))
    if same and not longer:
        return None
    old_lr, lr = optimizer_lr(saved.get("optimizer") or settings["optimizer"]), optimizer_lr(settings["optimizer"])
    for config in configs:
        scheduler = config.scheduler
        if isinstance(scheduler, ReduceLROnPlateau):
            _set_group_settings(optimizer, settings["optimizer"], None)
            _rescale(optimizer, lr / old_lr)
        else:
            _set_group_settings(optimizer, settings["optimizer"], lr)
            config.scheduler = _advanced(scheduler, settings.get("scheduler"), optimizer, total)
    if not configs:
        _set_group_settings(optimizer, settings["optimizer"], lr)
    position = max((int(getattr(c.scheduler, "last_epoch", 0)) for c in configs), default=0)
    return f"continues from step {position}" + (f" of {total}" if lengths and total is not None else "")


def _set_group_settings(optimizer: Optimizer, cfg: Mapping[str, Any], lr: float | None) -> None:
    """Each group at ``lr`` x its ``lr_scale`` (``None``: rates kept) and this run's other optimizer settings
    (no-decay groups keep a weight decay of 0)."""
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = group["scheduled_lr"] = lr * float(group.get("lr_scale", 1.0))
            for key in ("initial_lr", "max_lr", "min_lr"):  # a new schedule starts from the new rates
                group.pop(key, None)
        for key, value in cfg.items():
            if key in _NOT_RESETTABLE or key not in group or (key == "weight_decay" and group[key] == 0):
                continue
            group[key] = tuple(value) if isinstance(value, list) else value


def _rescale(optimizer: Optimizer, ratio: float) -> None:
    for group in optimizer.param_groups:
        group["scheduled_lr"] = group.get("scheduled_lr", group["lr"]) * ratio
        group["lr"] = group["lr"] * ratio


def _advanced(old: Any, cfg: Mapping[str, Any] | None, optimizer: Optimizer, total: int | None) -> Any:
    """A schedule built from ``cfg`` and stepped as many times as ``old`` was (its ``last_epoch``)."""
    import warnings

    built = build_scheduler(cfg, optimizer, total)
    if built is None:
        return old
    scheduler = built["scheduler"]
    position = int(getattr(old, "last_epoch", 0))
    if total is not None and position >= total and getattr(scheduler, "total_steps", None) is not None:
        raise ConfigError(
            f"resume=: the checkpoint is at step {position} but this run's schedule has only {total} steps; "
            f"raise trainer.max_epochs to continue it."
        )
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": a replay, not training
        warnings.simplefilter("ignore")
        for _ in range(position):
            scheduler.step()
    if isinstance(scheduler, FreezeGate):
        scheduler.set_epoch(int(getattr(old, "gate_epoch", 0)))
    return scheduler
