"""Staged unfreezing: train a new head on a frozen backbone, then the backbone too, at a lower lr.

The optimizer's param groups and the lr schedule are defined once, before the first step, over everything that
will ever train (:mod:`transfer.training.param_groups`, built by ``Classifier.configure_optimizers`` from
:attr:`StagedFinetuning.plan`). This callback adds nothing to the optimizer and writes no scheduler state; it
only does what a frozen epoch means:

* ``requires_grad``: a group's parameters train from its ``trains_from`` epoch and before that have
  ``requires_grad=False``, so their gradients stay ``None`` and the optimizer skips them (no weight decay, no
  momentum); the schedule holds their lr at 0 (:class:`~transfer.training.optim.FreezeGate`, told the epoch here).
* BatchNorm, explicitly: ``bn="train"`` keeps a frozen backbone's BN layers in train mode (running statistics
  adapt to the new data, affine parameters frozen), ``bn="frozen"`` keeps them in eval mode (the pretrained
  statistics are used and never updated). Lightning's ``BackboneFinetuning`` instead makes frozen BN affine
  parameters trainable, or with ``train_bn=False`` switches ``track_running_stats`` off.
* DDP: see :meth:`StagedFinetuning.on_after_backward`.

With ``unfreeze_at_epoch=0`` (the default) nothing is ever frozen and the callback leaves every parameter alone.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transfer.core.errors import ConfigError
from transfer.training.distributed import ddp_registered, sync_unregistered_grads
from transfer.training.optim import FreezeGate
from transfer.training.param_groups import GroupPlan, backbone_of, frozen_at, trainable_backbone_named

log = logging.getLogger(__name__)
BN_POLICIES = ("train", "frozen")

__all__ = ["BN_POLICIES", "StagedFinetuning", "batchnorms", "finetune_plan", "frozen_at"]


def batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def finetune_plan(trainer: L.Trainer | None) -> GroupPlan:
    """The plan of the trainer's :class:`StagedFinetuning`, or the default (everything trains at one lr) without one."""
    callbacks: list[L.Callback] = list(getattr(trainer, "callbacks", None) or [])
    return next((cb.plan for cb in callbacks if isinstance(cb, StagedFinetuning)), GroupPlan())


class StagedFinetuning(L.Callback):
    """Freeze ``pl_module.backbone`` until ``unfreeze_at_epoch``; the defaults are ``conf/finetune/staged.yaml``'s.

    Args:
        unfreeze_at_epoch: first epoch that trains the backbone; 0 trains it from the start, ``None`` never
            (a linear probe: the backbone is in no param group).
        backbone_lr_ratio: the backbone's (top layer's) lr is the head's times this, through the whole schedule.
        bn: BatchNorm policy while frozen, ``train`` or ``frozen`` (see the module docstring).
        layer_decay: layer-wise lr decay (fastai's discriminative rates, timm's ``param_groups_layer_decay``):
            the backbone is split into layers (:func:`~transfer.training.param_groups.backbone_layers`), the top
            one at the ratio's lr and each one below at ``layer_decay`` times the one above. 1 keeps a single
            backbone group.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int | None = 0,
        backbone_lr_ratio: float = 1.0,
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
        if bn == "frozen" and unfreeze_at_epoch == 0:
            log.warning(
                "finetune.bn=frozen has no effect with finetune.unfreeze_at_epoch=0: the backbone is never frozen, "
                "so its BatchNorm layers train as usual"
            )
        self.plan = GroupPlan(unfreeze_at_epoch, float(backbone_lr_ratio), float(layer_decay))
        self.bn = bn
        self._hand_synced: list[nn.Parameter] = []
        self._registered: set[int] = set()

    @property
    def unfreeze_at_epoch(self) -> int | None:
        """The first epoch that trains the backbone (``None``: never)."""
        return self.plan.unfreeze_at_epoch

    @property
    def stages(self) -> bool:
        """Whether anything is ever frozen; without that the callback has nothing to do."""
        return self.plan.unfreeze_at_epoch != 0

    def frozen_at(self, epoch: int) -> bool:
        """Whether the backbone is frozen during ``epoch`` (:func:`~transfer.training.param_groups.frozen_at`)."""
        return frozen_at(epoch, self.plan.unfreeze_at_epoch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the strategy wraps the model: DDP then leaves the frozen backbone out (see on_after_backward).
        if stage == "fit" and self.stages:
            for _, p in trainable_backbone_named(_model(pl_module)):
                p.requires_grad_(False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone_of(pl_module)  # fail here, not at the first epoch, on a module without one
        registered = ddp_registered(trainer, pl_module)
        if registered is not None:
            params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
            self._registered = registered
            self._hand_synced = [p for p in params if id(p) not in registered]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Also here: Lightning skips on_train_epoch_start in the epoch a mid-epoch checkpoint resumes inside.
        self._enter(trainer, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enter(trainer, trainer.current_epoch)
        if not self.stages:
            return
        # Set every epoch: Lightning restores each module's pre-validation mode after validation, so a BN layer
        # put in eval mode while frozen would otherwise stay there after the unfreeze.
        keep_eval = self.bn == "frozen" and self.frozen_at(trainer.current_epoch)
        for bn in batchnorms(backbone_of(pl_module)):
            bn.train(pl_module.training and not keep_eval)

    def _enter(self, trainer: L.Trainer, epoch: int) -> None:
        """Make ``requires_grad`` and the lr gate agree with ``epoch``."""
        if not self.stages:
            return
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                trains = not frozen_at(epoch, group.get("trains_from", 0))
                for p in group["params"]:
                    p.requires_grad_(trains)
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, FreezeGate):
                config.scheduler.set_epoch(epoch)
        if epoch == self.plan.unfreeze_at_epoch:
            log.info("epoch %d: backbone unfrozen", epoch + 1)  # numbered from 1, as the log is

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # DDP averages the gradients of the parameters that required them when it wrapped the model, so a
        # backbone frozen then and unfrozen later is averaged here, or each rank's backbone drifts on its own
        # shard. The alternative, registering everything with DDP and zeroing the frozen groups' gradients,
        # fails where the frozen epochs never run the backbone (cached features: DDP would wait for gradients
        # that never come) and pays a full backward pass in every frozen epoch. With unfreeze_at_epoch=0 DDP
        # registers every parameter and nothing is averaged by hand.
        if self._hand_synced and not self.frozen_at(trainer.current_epoch):
            sync_unregistered_grads(trainer, self._hand_synced, self._registered)

    def state_dict(self) -> dict[str, Any]:
        return {"unfreeze_at_epoch": self.plan.unfreeze_at_epoch, "bn": self.bn}


def _model(pl_module: L.LightningModule) -> nn.Module:
    """The module whose ``backbone`` is fine-tuned: the ``TransferModel`` inside a ``Classifier``, else the module."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) and hasattr(model, "backbone") else pl_module
