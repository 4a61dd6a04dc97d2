"""Metadata and weight sources read from torchvision and timm, so nothing is copied by hand."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn
from torchvision import models as tvm

from transfer.models.core import Split
from transfer.models.weights import WeightSource


def timm_split(net: nn.Module) -> Split:
    """Cut a timm model at its classifier: ``reset_classifier(0)`` keeps the global pooling, so the forward
    returns pooled features."""
    net.reset_classifier(0)
    return Split(net, None, net.num_features)


def torchvision_info(weights: tvm.WeightsEnum) -> dict[str, Any]:
    """``Architecture`` keyword arguments (weights, input size, mean/std, interpolation) for a torchvision enum."""
    tf = weights.transforms()
    return {
        "weights": WeightSource("url", weights.url),
        "input_size": int(tf.crop_size[0]),
        "mean": tuple(tf.mean),
        "std": tuple(tf.std),
        "interpolation": tf.interpolation.value,
    }


def timm_info(tag: str) -> dict[str, Any]:
    """Likewise for a timm ``architecture.tag`` published on the Hugging Face Hub."""
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise KeyError(f"timm has no pretrained config {tag!r}")
    return {
        "weights": WeightSource("hf", cfg.hf_hub_id or f"timm/{tag}"),
        "input_size": int(cfg.input_size[-1]),
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "interpolation": cfg.interpolation,
    }
