"""Architectures from torchvision, with its ImageNet-1k weights."""
from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from transfer.models.adapt import shrink_conv
from transfer.models.core import Architecture, register
from transfer.models.weights import WeightSource


def _url(weights: tvm.WeightsEnum) -> WeightSource:
    return WeightSource("url", weights.url)


def _resnet_split(net: nn.Module) -> tuple[nn.Module, int]:
    width = net.fc.in_features
    net.fc = nn.Identity()  # keep the torchvision ResNet object: residual inspection hooks its blocks
    return net, width


def _resnet_native(net: nn.Module) -> None:
    # 7x7/s2 conv + 3x3/s2 max-pool shrink 32 px to 8 px before the first block and leave a 1x1 map at
    # the end; a 3x3/s1 stem without the pool keeps 32 px into layer1 and a 4x4 map into the pooling.
    net.conv1 = shrink_conv(net.conv1, 3, 1)
    net.maxpool = nn.Identity()


def _alexnet_split(net: nn.Module) -> tuple[nn.Module, int]:
    last = net.classifier[-1]
    net.classifier[-1] = nn.Identity()  # fc6/fc7 are pretrained and stay with the backbone
    return net, last.in_features


def _alexnet_native(net: nn.Module) -> None:
    # The source material's 32 px AlexNet: 3x3/s1 first conv and 2x2 first pool give 16 -> 7 -> 3 px maps;
    # AdaptiveAvgPool2d(6) still feeds the 256*6*6 inputs fc6 expects, so the pretrained classifier fits.
    net.features[0] = shrink_conv(net.features[0], 3, 1)
    net.features[2] = nn.MaxPool2d(kernel_size=2, stride=2)


register(Architecture(
    name="resnet18", family="resnet", build=lambda: tvm.resnet18(weights=None), split=_resnet_split,
    weights=_url(tvm.ResNet18_Weights.IMAGENET1K_V1), adapters={"native": _resnet_native}))

register(Architecture(
    name="alexnet", family="alexnet", build=lambda: tvm.alexnet(weights=None), split=_alexnet_split,
    weights=_url(tvm.AlexNet_Weights.IMAGENET1K_V1), adapters={"native": _alexnet_native}))
