"""A backbone's layers from input to output, for layer-wise learning-rate decay.

Most families name their blocks with numbers (``layer1.0``, ``features.5``, ``blocks.3``), which
:func:`numbered` reads. Where names alone do not tell (torchvision's ``encoder_layer_N``, ``denseblockN``,
Inception's ``Mixed_5b``, a backbone wrapped in an ``nn.Sequential``), the architecture registers its own rule
(``Architecture.layers``); timm models use timm's own ``group_matcher``, the grouping its layer decay uses.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable

from timm.models import group_parameters
from torch import nn

from transfer.models.core import REGISTRY, LayerRule, TransferModel

Layer = list[tuple[str, nn.Parameter]]


def backbone_layers(model: TransferModel) -> list[Layer]:
    """Split a model's trainable backbone parameters into layers, shallowest (the stem) first.

    Every trainable backbone parameter (all but ``model.fixed``) is in exactly one layer, and reading the layers in
    order reads the parameters in module order.

    Args:
        model: a :class:`~transfer.models.TransferModel` from :func:`~transfer.models.create_model`.

    Returns:
        One list of ``(name, parameter)`` pairs per layer; names are those inside ``model.backbone``.
    """
    named = model.trainable_backbone_named()
    arch = REGISTRY.get(model.meta.name)
    rule = arch.layers if arch is not None and arch.layers is not None else numbered
    keys = rule(model.backbone, [name for name, _ in named])
    layers: list[Layer] = []
    current: Hashable | None = None
    for pair, key in zip(named, keys, strict=True):
        if not layers or (key is not None and key != current):
            layers.append([])
        if key is not None:
            current = key
        layers[-1].append(pair)
    return layers


def numbered(backbone: nn.Module, names: list[str]) -> list[Hashable | None]:
    """The generic rule: a layer is a numbered block, the name up to its first number (``layer1.0``).

    Parameters without a number before the first block are the stem; those after a block (a head conv, a final
    norm) join the last block.
    """
    keys: list[Hashable | None] = []
    for name in names:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        keys.append(".".join(parts[: index + 1]) if index is not None else None)
    return keys


def patterns(*regexes: str) -> LayerRule:
    """A rule from regular expressions: a name's layer is the text the first matching one matches at its start.

    Names no pattern matches stay in the layer before them (before any match: the stem).
    """
    compiled = [re.compile(r) for r in regexes]

    def rule(backbone: nn.Module, names: list[str]) -> list[Hashable | None]:
        keys: list[Hashable | None] = []
        for name in names:
            match = next((m for m in (c.match(name) for c in compiled) if m is not None), None)
            keys.append(match.group(0) if match is not None else None)
        return keys

    return rule


@runtime_checkable
class TimmGrouped(Protocol):
    """A timm model: it says how its parameters group into layers."""

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]: ...


def timm_layers(backbone: nn.Module, names: list[str]) -> list[Hashable | None]:
    """timm's own split: the model's fine-grained ``group_matcher``, as timm's ``param_groups_layer_decay``."""
    if not isinstance(backbone, TimmGrouped):
        raise TypeError(f"expected a timm model, got a {type(backbone).__name__}")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
    layer_of = {name: index for index, members in enumerate(groups.values()) for name in members}
    return [layer_of[name] for name in names]


# AlexNet/VGG: the backbone wraps `features` in an nn.Sequential, so every conv is named `0.<i>`.
SEQUENTIAL_FEATURES = patterns(r"0\.\d+\.")
# DenseNet: each dense layer; a transition and the final norm join the layer before them.
DENSENET = patterns(r"features\.denseblock\d+\.denselayer\d+\.")
# GoogLeNet, Inception v3: one layer per top-level module (conv1, inception3a, ..., Conv2d_1a_3x3, Mixed_5b, ...).
TOP_LEVEL = patterns(r"[^.]+\.")
# torchvision ViT: class token, patch projection and position embedding are the stem; the final norm joins the last
# encoder layer.
TORCHVISION_VIT = patterns(r"encoder\.layers\.encoder_layer_\d+\.")
# torchvision Swin: features.0 is the patch embedding (the stem); then each block of a stage, and each patch-merging
# layer between stages, is a layer; the final norm joins the last block.
SWIN = patterns(r"features\.(?!0\.)\d+\.\d+\.", r"features\.(?!0\.)\d+\.")
