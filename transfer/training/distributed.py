"""What staged fine-tuning needs under DDP, and a check that the ranks really trained one model.

DDP registers, when it wraps the model, the parameters that require gradients at that moment. With a late
unfreeze (``finetune.unfreeze_at_epoch`` > 0) Lightning wraps after the finetuning callback's ``setup`` has
frozen the backbone, so once the backbone trains its gradients would be computed on every rank but never
averaged, and the ranks' backbones would drift apart silently. :func:`sync_unregistered_grads` all-reduces exactly
those gradients after each backward; with ``unfreeze_at_epoch=0`` nothing is frozen at the wrap, DDP registers
every parameter and overlaps their all-reduce with the backward pass, and nothing is left to it.
:func:`weights_in_sync` compares a digest of every rank's weights at the end of training.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from transfer.core.provenance import state_digest


def ddp_registered(trainer: L.Trainer, pl_module: nn.Module) -> set[int] | None:
    """ids of the parameters the DDP wrapper averages, or ``None`` when the run is not DDP-wrapped.

    Call it after the wrap and before anything is unfrozen (``on_fit_start``): DDP averages the parameters
    that required gradients when it wrapped the model, and does not say which afterwards.
    """
    if not isinstance(getattr(trainer.strategy, "model", None), nn.parallel.DistributedDataParallel):
        return None
    return {id(p) for p in pl_module.parameters() if p.requires_grad}


@torch.no_grad()
def sync_unregistered_grads(trainer: L.Trainer, params: list[nn.Parameter], registered: set[int]) -> None:
    """Average, across ranks, the gradients of ``params`` that DDP does not average itself.

    Args:
        trainer: the running trainer (its world size decides whether anything is done).
        params: candidates, e.g. the backbone parameters the finetuning callback unfroze.
        registered: :func:`ddp_registered` of the run.
    """
    grads = [p.grad for p in params if p.grad is not None and id(p) not in registered]
    if not grads or trainer.world_size < 2 or not dist.is_initialized():
        return
    flat = _flatten_dense_tensors(grads)  # one collective instead of one per tensor
    dist.all_reduce(flat)
    flat /= trainer.world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def weights_in_sync(trainer: L.Trainer, module: nn.Module) -> bool | None:
    """Whether all ranks hold bit-identical weights; ``None`` for a single-process run."""
    if trainer.world_size < 2:
        return None
    digest = int(state_digest(module.state_dict())[:15], 16)  # 60 bits: fits an int64 tensor
    mine = torch.tensor([digest], dtype=torch.int64, device=trainer.strategy.root_device)
    everyone = trainer.strategy.all_gather(mine)
    return bool((everyone == mine).all())
