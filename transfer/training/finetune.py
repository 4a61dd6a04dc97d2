"""Staged unfreezing: train a new head on a frozen backbone, then unfreeze the backbone at a lower lr.

Built on Lightning's :class:`~lightning.pytorch.callbacks.BackboneFinetuning`, keeping its contract (a
``backbone`` attribute, param groups stored in the callback state and restored on resume) but replacing
three of its behaviours that are wrong for this recipe:

* BatchNorm: ``BackboneFinetuning`` freezes with ``train_bn=True`` whatever you pass, which makes the frozen
  backbone's BN affine parameters trainable (and, since they are then picked up by ``configure_optimizers``,
  trained at the head's lr); Lightning's ``train_bn=False`` sets ``track_running_stats=False``, so the layers
  normalise with batch statistics in training instead of the pretrained ones. Here the policy is explicit:
  ``bn="train"`` keeps frozen BN layers in train mode (running statistics adapt to the new data, affine
  parameters frozen), ``bn="frozen"`` keeps them in eval mode (pretrained statistics used and never updated).
* The backbone lr: ``BackboneFinetuning`` rewrites it every epoch from its own lambda, undoing what an lr
  scheduler does; here the scheduler owns it after the unfreeze, and is told about the new group.
* Parameter matching: Lightning filters parameters already in the optimizer with ``torch.equal`` on values,
  which also drops distinct parameters that happen to hold equal values; here identity is used.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import OneCycleLR

from transfer.core.errors import ConfigError
from transfer.training.distributed import ddp_registered, sync_unregistered_grads
from transfer.training.optim import WarmupCosine

log = logging.getLogger(__name__)
BN_POLICIES = ("train", "frozen")


def frozen_at(epoch: int, unfreeze_at_epoch: int | None) -> bool:
    """The one rule for "is the backbone frozen during ``epoch``": before ``unfreeze_at_epoch``, or always when
    that is ``None`` (a linear probe). The finetuning callback and the feature cache both ask it."""
    return unfreeze_at_epoch is None or epoch < unfreeze_at_epoch


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """Switch gradients of every parameter in ``module``."""
    for p in module.parameters():
        p.requires_grad_(flag)


def unfreezable(pl_module: L.LightningModule) -> list[nn.Parameter]:
    """Backbone parameters the unfreeze may train: all but those the model keeps fixed (VGG16's first convs)."""
    return [p for _, p in unfreezable_named(pl_module)]


def unfreezable_named(pl_module: L.LightningModule) -> list[tuple[str, nn.Parameter]]:
    """:func:`unfreezable` with the parameters' names inside the backbone, in module order."""
    model = getattr(pl_module, "model", None)
    if model is not None and hasattr(model, "trainable_backbone_named"):
        return model.trainable_backbone_named()
    return list(pl_module.backbone.named_parameters())


def layer_groups(named: list[tuple[str, nn.Parameter]]) -> list[list[nn.Parameter]]:
    """Split backbone parameters into layers from input to output, for layer-wise lr decay.

    A layer is a numbered block (``layer1.0``, ``blocks.3``, ``features.5``: the name up to its first number);
    parameters without a number before the first block are the stem, a layer of their own; those after a block
    (a head conv) join the last block. Works across torchvision and timm families without a per-model table.

    Args:
        named: ``(name, parameter)`` pairs in module order.

    Returns:
        The parameters of each layer, shallowest first.
    """
    groups: list[list[nn.Parameter]] = []
    current: str | None = None
    for name, param in named:
        parts = name.split(".")
        numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        key = ".".join(parts[: numbered + 1]) if numbered is not None else None
        if not groups or (key is not None and key != current):
            groups.append([])
        if key is not None:
            current = key
        groups[-1].append(param)
    return groups


def batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


class StagedFinetuning(BackboneFinetuning):
    """Freeze ``pl_module.backbone`` until ``unfreeze_at_epoch``, then add it as a param group.

    Args:
        unfreeze_at_epoch: first epoch that trains the backbone; 0 trains it from the start, ``None`` never
            (a linear probe).
        backbone_lr_ratio: the backbone group's lr is the head group's times this (its current lr, and for
            per-step schedules its peak too).
        bn: BatchNorm policy while frozen, ``train`` or ``frozen`` (see the module docstring).
        layer_decay: layer-wise lr decay (fastai's discriminative rates, timm's ``param_groups_layer_decay``):
            the backbone is split into layers (:func:`layer_groups`), the top one at the ratio's lr and each
            one below at ``layer_decay`` times the one above. 1 keeps a single backbone group.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int | None = 5,
        backbone_lr_ratio: float = 0.1,
        bn: str = "train",
        layer_decay: float = 1.0,
    ) -> None:
        if bn not in BN_POLICIES:
            raise ConfigError(f"finetune.bn={bn!r} is not one of {BN_POLICIES}.")
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={unfreeze_at_epoch}: use 0 or more, or null to never unfreeze."
            )
        if backbone_lr_ratio <= 0:
            raise ConfigError(f"finetune.backbone_lr_ratio={backbone_lr_ratio} must be positive.")
        if not 0 < layer_decay <= 1:
            raise ConfigError(
                f"finetune.layer_decay={layer_decay} must be in (0, 1]; 1 gives the whole backbone "
                f"one lr, 0.7-0.9 lowers it by that factor per layer from the top down."
            )
        super().__init__(
            unfreeze_backbone_at_epoch=unfreeze_at_epoch if unfreeze_at_epoch is not None else -1,
            backbone_initial_ratio_lr=backbone_lr_ratio,
            train_bn=bn == "train",
        )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.bn = bn
        self.layer_decay = float(layer_decay)
        self._ddp_registered: set[int] | None = None

    def frozen_at(self, epoch: int) -> bool:
        """Whether the backbone is frozen during ``epoch`` (:func:`frozen_at`)."""
        return frozen_at(epoch, self.unfreeze_at_epoch)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        set_requires_grad(pl_module.backbone, False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.frozen_at(epoch):
            return
        named = unfreezable_named(pl_module)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for _, p in named:
            p.requires_grad_(True)
        if any(id(p) in in_optimizer for _, p in named):
            return  # already unfrozen, or its groups were restored from a checkpoint
        layers = layer_groups(named) if self.layer_decay != 1.0 else [[p for _, p in named]]
        head = optimizer.param_groups[0]
        for depth, params in enumerate(layers):
            scale = self.backbone_initial_ratio_lr * self.layer_decay ** (len(layers) - 1 - depth)
            name = "backbone" if len(layers) == 1 else f"backbone.{depth}"
            optimizer.add_param_group({"params": params, "lr": head["lr"] * scale, "name": name})
            self._sync_schedulers(pl_module.trainer, optimizer, scale)
        self.previous_backbone_lr = optimizer.param_groups[-1]["lr"]
        log.info(
            "epoch %d: backbone unfrozen, %d tensors in %d group(s), lr %.3g (deepest) .. %.3g (top)",
            epoch,
            len(named),
            len(layers),
            optimizer.param_groups[-len(layers)]["lr"],
            self.previous_backbone_lr,
        )

    @staticmethod
    def _sync_schedulers(trainer: L.Trainer, optimizer: Optimizer, scale: float) -> None:
        """Tell the optimizer's lr schedulers about the group just added, so they schedule it too.

        The new group's lr is ``scale`` x the head group's: its current lr (set by the caller) and, for
        schedules that remember a peak or base per group (one-cycle, warm-up cosine, cosine), that too.
        """
        group, head = optimizer.param_groups[-1], optimizer.param_groups[0]
        group.setdefault("initial_lr", group["lr"])
        for config in trainer.lr_scheduler_configs:
            sched: Any = config.scheduler
            if sched.optimizer is not optimizer:
                continue
            if hasattr(sched, "min_lrs"):  # ReduceLROnPlateau: same floor as the head's group
                sched.min_lrs = list(sched.min_lrs) + [sched.min_lrs[-1]]
            if isinstance(sched, OneCycleLR):  # it keeps its per-group curve in the param group itself
                for key in ("initial_lr", "max_lr", "min_lr"):
                    group[key] = head[key] * scale
                for key in ("max_momentum", "base_momentum"):
                    if key in head:
                        group[key] = head[key]
            elif isinstance(sched, WarmupCosine):  # peak x the schedule's factor
                group["initial_lr"] = sched.base_lrs[0] * scale
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = list(sched.base_lrs) + [group["initial_lr"]]
                sched._last_lr = list(getattr(sched, "_last_lr", sched.base_lrs[:-1])) + [group["lr"]]
            if hasattr(sched, "lr_lambdas"):
                sched.lr_lambdas = list(sched.lr_lambdas) + [sched.lr_lambdas[-1]]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Set every epoch: Lightning restores each module's pre-validation mode after validation, so a BN layer
        # put in eval mode while frozen would otherwise stay there after the unfreeze.
        keep_eval = self.bn == "frozen" and self.frozen_at(trainer.current_epoch)
        for bn in batchnorms(pl_module.backbone):
            bn.train(pl_module.training and not keep_eval)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._ddp_registered = ddp_registered(trainer, pl_module)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # DDP wrapped the model while the backbone was frozen, so it will never average the backbone's
        # gradients: do it here, or each rank's backbone drifts on its own shard of the data.
        if self._ddp_registered is not None and not self.frozen_at(trainer.current_epoch):
            sync_unregistered_grads(trainer, unfreezable(pl_module), self._ddp_registered)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfreeze_at_epoch": self.unfreeze_at_epoch, "bn": self.bn}
