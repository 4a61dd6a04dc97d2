"""The optimizer's parameter groups, built once from the model before the first step.

As fastai's splitters and discriminative learning rates and timm's ``param_groups_layer_decay`` do it: every
parameter that may ever train is in exactly one group from the start, so the optimizer, its state and the lr
schedule have the same layout on every run and every resume. The groups are

* the head (the neck, where a family has one, trains with it) at ``optimizer.lr``;
* the backbone, one group, or with ``layer_decay < 1`` one per layer (:func:`backbone_layers`), the top layer at
  ``backbone_lr_ratio`` x that lr and each one below at ``layer_decay`` x the one above;
* each of those split again: 1-d tensors (norm weights, biases) and embeddings that names mark as such (position
  embeddings, class tokens) get ``weight_decay=0``, as timm and the torchvision references do, in a twin group
  named ``<group>.no_decay``.

Each group carries its ``name`` (the lr monitor and the history show it), ``lr_scale`` (its lr over
``optimizer.lr``, which per-group schedule arguments such as one-cycle's ``max_lr`` are scaled by) and
``trains_from``: the first epoch it trains. Until then the finetuning callback keeps its parameters at
``requires_grad=False`` and the lr schedule holds its lr at 0 (:class:`transfer.training.optim.FreezeGate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

Named = list[tuple[str, nn.Parameter]]

# Last name segments of tensors that are embeddings rather than weights (timm's and torchvision's lists):
# decaying a position embedding or a class token towards zero only erases what pretraining put there.
NO_DECAY_NAMES = frozenset(
    {
        "cls_token",
        "class_token",
        "dist_token",
        "pos_embed",
        "pos_embedding",
        "position_embedding",
        "absolute_pos_embed",
        "relative_position_bias_table",
    }
)


@dataclass(frozen=True)
class GroupPlan:
    """What the groups depend on besides the model: the ``finetune`` settings (their meaning is
    :class:`~transfer.training.finetune.StagedFinetuning`'s). The defaults, for a module trained without the
    finetuning callback, train everything from the start at one lr, as ``conf/finetune/staged.yaml`` does."""

    unfreeze_at_epoch: int | None = 0
    backbone_lr_ratio: float = 1.0
    layer_decay: float = 1.0


def frozen_at(epoch: int, trains_from: int | None) -> bool:
    """The one rule for "is it frozen during ``epoch``": before ``trains_from``, or always when that is ``None``
    (a linear probe's backbone). The finetuning callback, the lr schedule and the feature cache all ask it."""
    return trains_from is None or epoch < trains_from


def layer_groups(named: Named) -> list[Named]:
    """Split backbone parameters into layers from input to output, for layer-wise lr decay.

    A layer is a numbered block (``layer1.0``, ``blocks.3``, ``features.5``: the name up to its first number);
    parameters without a number before the first block are the stem, a layer of their own; those after a block
    (a head conv) join the last block. Works across torchvision and timm families without a per-model table.

    Args:
        named: ``(name, parameter)`` pairs in module order.

    Returns:
        The ``(name, parameter)`` pairs of each layer, shallowest first.
    """
    groups: list[Named] = []
    current: str | None = None
    for name, param in named:
        parts = name.split(".")
        numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        key = ".".join(parts[: numbered + 1]) if numbered is not None else None
        if not groups or (key is not None and key != current):
            groups.append([])
        if key is not None:
            current = key
        groups[-1].append((name, param))
    return groups


def trainable_backbone_named(model: nn.Module) -> Named:
    """Backbone parameters fine-tuning may train, named inside the backbone: all but those the model keeps fixed
    (e.g. VGG16's first convs), in module order."""
    own = getattr(model, "trainable_backbone_named", None)
    return list(own()) if callable(own) else list(backbone_of(model).named_parameters())


def backbone_of(model: nn.Module) -> nn.Module:
    """``model.backbone``, checked to be a module."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(model).__name__} has no `backbone` module to fine-tune")
    return backbone


def backbone_layers(model: nn.Module) -> list[Named]:
    """The backbone's trainable parameters in layers, shallowest first.

    A model may supply its own split with a ``layer_split()`` method returning ordered lists of
    ``(name, parameter)`` pairs (for families whose names alone do not tell the depth); without one the generic
    :func:`layer_groups` rule splits the names.

    Raises:
        ValueError: the model's split does not hold every trainable backbone parameter exactly once.
    """
    trainable = trainable_backbone_named(model)
    split = getattr(model, "layer_split", None)
    if not callable(split):
        return layer_groups(trainable)
    layers = [list(layer) for layer in split() if layer]
    given = [id(p) for layer in layers for _, p in layer]
    if len(given) != len(set(given)) or set(given) != {id(p) for _, p in trainable}:
        raise ValueError(
            f"{type(model).__name__}.layer_split() must hold every trainable backbone parameter exactly once "
            f"({len(given)} entries, {len(set(given))} distinct, {len(trainable)} trainable)."
        )
    return layers


def head_named(model: nn.Module) -> Named:
    """What trains from the first step: every parameter outside the backbone (head and neck) that may train."""
    in_backbone = {id(p) for p in backbone_of(model).parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in in_backbone and p.requires_grad]


def exempt_from_decay(name: str, param: nn.Parameter) -> bool:
    """1-d tensors (norm weights and biases) and named embeddings (:data:`NO_DECAY_NAMES`) get no weight decay."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def _blocks(model: nn.Module, plan: GroupPlan) -> list[tuple[str, float, int | None, Named]]:
    """``(name, lr scale, first epoch it trains, parameters)`` of the head and each backbone block."""
    blocks: list[tuple[str, float, int | None, Named]] = [("head", 1.0, 0, head_named(model))]
    if plan.unfreeze_at_epoch is None:  # a linear probe: the backbone never trains, so it is in no group
        return blocks
    ratio, decay = plan.backbone_lr_ratio, plan.layer_decay
    layers = backbone_layers(model) if decay != 1.0 else [trainable_backbone_named(model)]
    for depth, layer in enumerate(layers):
        name = "backbone" if len(layers) == 1 else f"backbone.{depth}"
        blocks.append((name, ratio * decay ** (len(layers) - 1 - depth), plan.unfreeze_at_epoch, layer))
    return blocks


def build_param_groups(model: nn.Module, plan: GroupPlan, lr: float) -> list[dict[str, Any]]:
    """The torch param groups of ``model`` for ``plan`` (see the module docstring for their layout and keys).

    Args:
        model: a :class:`~transfer.models.TransferModel` (``backbone``, ``neck``, ``head``), or any module with a
            ``backbone`` attribute.
        plan: the ``finetune`` settings.
        lr: ``optimizer.lr``, the head's rate; every other group's is this times its ``lr_scale``.

    Returns:
        Param groups in a fixed order (head first, then the backbone from its deepest layer up), empty ones left
        out, each parameter in exactly one.
    """
    groups: list[dict[str, Any]] = []
    for name, scale, trains_from, named in _blocks(model, plan):
        decayed = [p for n, p in named if not exempt_from_decay(n, p)]
        exempt = [p for n, p in named if exempt_from_decay(n, p)]
        for suffix, params, extra in (("", decayed, {}), (".no_decay", exempt, {"weight_decay": 0.0})):
            if params:
                groups.append(
                    {
                        "params": params,
                        "name": name + suffix,
                        "lr": lr * scale,
                        "lr_scale": scale,
                        "trains_from": trains_from,
                        **extra,
                    }
                )
    return groups


def describe(groups: Sequence[dict[str, Any]], lr: float) -> str:
    """One line for the run's log: how many groups, their rates, and what is frozen until when.

    Args:
        groups: the optimizer's param groups, as :func:`build_param_groups` made them.
        lr: ``optimizer.lr``; the rates shown are the groups' configured ones (a schedule moves them from there).

    Returns:
        e.g. ``4 param groups (2 without weight decay), 62 tensors: head lr 0.001; backbone lr 0.0001, frozen for
        2 epoch(s), trained from epoch 3`` (epochs counted from 1, as everywhere people read them).
    """
    tensors = sum(len(g["params"]) for g in groups)
    exempt = sum(1 for g in groups if str(g.get("name", "")).endswith(".no_decay"))
    backbone = [g for g in groups if str(g.get("name", "")).startswith("backbone")]
    parts = [f"head lr {lr:.3g}"]
    if not backbone:
        parts.append("backbone frozen throughout (in no group)")
    else:
        scales = sorted({float(g["lr_scale"]) for g in backbone})
        layers = len({str(g["name"]).removesuffix(".no_decay") for g in backbone})
        if len(scales) == 1:
            rates = f"lr {lr * scales[0]:.3g}"
        else:
            rates = f"{layers} layers, lr {lr * scales[0]:.3g} (deepest) .. {lr * scales[-1]:.3g} (top)"
        start = backbone[0]["trains_from"]
        parts.append(
            f"backbone {rates}, "
            + (f"frozen for {start} epoch(s), trained from epoch {start + 1}" if start else "trains from the start")
        )
    return f"{len(groups)} param groups ({exempt} without weight decay), {tensors} tensors: " + "; ".join(parts)
