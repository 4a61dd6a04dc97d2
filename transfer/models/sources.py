"""Pretrained configs and weight sources read from torchvision and timm, so nothing is copied by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import timm
from torch import nn
from torchvision import models as tvm

from transfer.models.core import Split
from transfer.models.pretrained import PretrainedCfg, resize_for
from transfer.models.weights import WeightSource


@runtime_checkable
class TimmClassifier(Protocol):
    """What every timm classification model has: its feature width and a way to replace its classifier."""

    num_features: int

    def reset_classifier(self, num_classes: int) -> None: ...


def timm_split(net: nn.Module) -> Split:
    """Cut a timm model at its classifier: ``reset_classifier(0)`` keeps the global pooling, so the forward
    returns pooled features."""
    if not isinstance(net, TimmClassifier):
        raise TypeError(f"expected a timm model, got a {type(net).__name__}")
    net.reset_classifier(0)
    return Split(net, None, int(net.num_features))


def torchvision_cfg(
    weights: tvm.WeightsEnum, auto_adapt: str = "by_size", small_input_size: int | None = None
) -> PretrainedCfg:
    """The :class:`PretrainedCfg` of a torchvision weights enum, from its ``transforms()``.

    Args:
        weights: e.g. ``ResNet50_Weights.IMAGENET1K_V2``.
        auto_adapt: the model's ``adapt=auto`` rule (see :class:`PretrainedCfg`).
        small_input_size: see :class:`PretrainedCfg`.
    """
    tf = weights.transforms()
    return PretrainedCfg(
        source=WeightSource("url", weights.url),
        input_size=int(tf.crop_size[0]),
        resize_size=int(tf.resize_size[0]),
        mean=_rgb(tf.mean),
        std=_rgb(tf.std),
        interpolation=tf.interpolation.value,
        auto_adapt=auto_adapt,
        small_input_size=small_input_size,
    )


def timm_cfg(
    tag: str,
    source: WeightSource | None = None,
    auto_adapt: str = "by_size",
    small_input_size: int | None = None,
) -> PretrainedCfg:
    """Likewise for a timm ``architecture.tag``, from timm's ``pretrained_cfg``.

    Args:
        tag: e.g. ``deit_small_patch16_224.fb_in1k``.
        source: where the weights live; ``None``: the tag's Hugging Face Hub repo, where timm publishes them.
        auto_adapt: the model's ``adapt=auto`` rule.
        small_input_size: see :class:`PretrainedCfg`.
    """
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise KeyError(f"timm has no pretrained config {tag!r}")
    size = int(cfg.input_size[-1])
    return PretrainedCfg(
        source=source or WeightSource("hf", cfg.hf_hub_id or f"timm/{tag}"),
        input_size=size,
        resize_size=resize_for(size, cfg.crop_pct),
        mean=_rgb(cfg.mean),
        std=_rgb(cfg.std),
        interpolation=cfg.interpolation,
        auto_adapt=auto_adapt,
        small_input_size=small_input_size,
    )


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return (r, g, b)
