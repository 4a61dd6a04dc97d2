"""Classic CNNs: LeNet-5, AlexNet, VGG16, ResNets, DenseNet, GoogLeNet, Inception v3, Inception-ResNet v2.

``adapt=native`` per family, for 32 px inputs (final feature map in brackets):

* AlexNet: 11x11/s4 conv -> 3x3/s1 (kernels resampled), first pool 3/2 -> 2/2 (3x3, pooled to 6x6 for fc6).
* VGG16: unchanged; five 2x2 pools leave 1x1, which the adaptive pool spreads to the 7x7 fc6 expects.
* ResNet, DenseNet: 7x7/s2 stem -> 3x3/s1 (kernels resampled), stem max-pool removed (4x4).
* GoogLeNet: 7x7/s2 conv1 -> 3x3/s1, maxpool1 removed (4x4).
* Inception v3 / Inception-ResNet v2: first conv stride 2 -> 1, both stem max-pools removed (5x5);
  without this the 32 px input is smaller than their valid-padding stems can take.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import timm
from torch import nn
from torchvision import models as tvm

from transfer.models.adapt import conv_at, expect, shrink_conv, swap
from transfer.models.core import Architecture, Split, register
from transfer.models.layers import DENSENET, SEQUENTIAL_FEATURES, TOP_LEVEL, timm_layers
from transfer.models.pretrained import scratch
from transfer.models.sources import timm_cfg, timm_split, torchvision_cfg


def _fc_split(attr: str):
    def split(net: nn.Module) -> Split:
        width = getattr(net, attr).in_features
        setattr(net, attr, nn.Identity())  # keep the torchvision object: residual inspection hooks its blocks
        return Split(net, None, width)

    return split


def _classifier_neck_split(net: nn.Module) -> Split:
    # AlexNet/VGG: conv features are the backbone; the pretrained fc6/fc7 form the neck and train with the head.
    layers = list(net.get_submodule("classifier").children())
    width = expect(layers[-1], nn.Linear).in_features
    backbone = nn.Sequential(net.get_submodule("features"), net.get_submodule("avgpool"), nn.Flatten(1))
    return Split(backbone, nn.Sequential(*layers[:-1]), width)


def _stem_native(conv: str, pool: str) -> Callable[[nn.Module], None]:
    """A 3x3/s1 stem conv resampled from the pretrained one, and the stem max-pool removed."""

    def adapt(net: nn.Module) -> None:
        swap(net, conv, shrink_conv(conv_at(net, conv), 3, 1))
        swap(net, pool, nn.Identity())

    return adapt


def _alexnet_native(net: nn.Module) -> None:
    swap(net, "features.0", shrink_conv(conv_at(net, "features.0"), 3, 1))
    swap(net, "features.2", nn.MaxPool2d(kernel_size=2, stride=2))


def _stride_one_native(conv: str, *pools: str) -> Callable[[nn.Module], None]:
    """The first conv's stride 2 -> 1 and both stem max-pools removed (the valid-padding Inception stems)."""

    def adapt(net: nn.Module) -> None:
        conv_at(net, conv).stride = (1, 1)
        for pool in pools:
            swap(net, pool, nn.Identity())

    return adapt


_resnet_native = _stem_native("conv1", "maxpool")
_densenet_native = _stem_native("features.conv0", "features.pool0")
_googlenet_native = _stem_native("conv1.conv", "maxpool1")
_inception_v3_native = _stride_one_native("Conv2d_1a_3x3.conv", "maxpool1", "maxpool2")
_inception_resnet_native = _stride_one_native("conv2d_1a.conv", "maxpool_3a", "maxpool_5a")


class LeNet5(nn.Module):
    """LeCun et al. (1998) on 32x32 RGB: the historical baseline, always trained from scratch."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(1),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


for _name, _ctor, _weights in (
    ("resnet18", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    ("resnet50", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    ("resnet152", tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V2),
):
    register(
        Architecture(
            name=_name,
            family="resnet",
            build=partial(_ctor, weights=None),
            split=_fc_split("fc"),
            classifier="fc.",
            adapters={"native": _resnet_native},
            pretrained_cfg=torchvision_cfg(_weights),
        )
    )

register(
    Architecture(
        name="alexnet",
        family="alexnet",
        build=lambda: tvm.alexnet(weights=None),
        split=_classifier_neck_split,
        classifier="classifier.6.",
        layers=SEQUENTIAL_FEATURES,
        adapters={"native": _alexnet_native},
        pretrained_cfg=torchvision_cfg(tvm.AlexNet_Weights.IMAGENET1K_V1),
    )
)

register(
    Architecture(
        name="vgg16",
        family="vgg",
        build=lambda: tvm.vgg16(weights=None),
        split=_classifier_neck_split,
        classifier="classifier.6.",
        layers=SEQUENTIAL_FEATURES,
        pretrained_cfg=torchvision_cfg(tvm.VGG16_Weights.IMAGENET1K_V1),
    )
)

register(
    Architecture(
        name="densenet121",
        family="densenet",
        build=lambda: tvm.densenet121(weights=None),
        split=_fc_split("classifier"),
        classifier="classifier.",
        adapters={"native": _densenet_native},
        layers=DENSENET,
        pretrained_cfg=torchvision_cfg(tvm.DenseNet121_Weights.IMAGENET1K_V1),
    )
)

# transform_input=True: the original GoogLeNet/Inception weights expect (x - 0.5) / 0.5 inputs; torchvision
# converts from ImageNet normalisation inside the model, which is what it does when it loads these weights.
register(
    Architecture(
        name="googlenet",
        family="inception",
        build=lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=True),
        split=_fc_split("fc"),
        classifier="fc.",
        adapters={"native": _googlenet_native},
        layers=TOP_LEVEL,
        pretrained_cfg=torchvision_cfg(tvm.GoogLeNet_Weights.IMAGENET1K_V1),
    )
)

register(
    Architecture(
        name="inception_v3",
        family="inception",
        build=lambda: tvm.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True),
        split=_fc_split("fc"),
        classifier="fc.",
        adapters={"native": _inception_v3_native},
        layers=TOP_LEVEL,
        pretrained_cfg=torchvision_cfg(tvm.Inception_V3_Weights.IMAGENET1K_V1),
    )
)

register(
    Architecture(
        name="inception_resnet_v2",
        family="inception",
        build=lambda: timm.create_model("inception_resnet_v2", pretrained=False),
        split=timm_split,
        classifier="classif.",
        adapters={"native": _inception_resnet_native},
        layers=timm_layers,
        pretrained_cfg=timm_cfg("inception_resnet_v2.tf_in1k"),
    )
)

register(
    Architecture(
        name="lenet5",
        family="lenet",
        build=LeNet5,
        split=_fc_split("fc"),
        # No pretrained weights, so normalise with CIFAR-10's own statistics.
        pretrained_cfg=scratch(32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    )
)
