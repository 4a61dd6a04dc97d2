"""Every zoo backbone splits into layers, stem first, for layer-wise lr decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from transfer.core.errors import ConfigError
from transfer.models import REGISTRY, backbone_layers, create_model
from transfer.models.layers import numbered


def _on_meta(name: str, **kwargs):
    """The model with shapes only (no memory, no weights): adapted as a CIFAR run adapts it."""
    with torch.device("meta"):
        return create_model(name, 10, pretrained=False, adapt="native", **kwargs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_backbone_splits_into_layers_that_follow_depth(name: str):
    model = _on_meta(name)
    layers = backbone_layers(model)
    assert len(layers) > 1 and all(layers)
    # every trainable backbone parameter exactly once, and layer after layer reads them in module order
    assert [n for layer in layers for n, _ in layer] == [n for n, _ in model.trainable_backbone_named()]
    params = [p for layer in layers for _, p in layer]
    assert len({id(p) for p in params}) == len(params) == len(list(model.backbone.parameters()))


def _count(module: nn.Module, *kinds: type) -> int:
    return sum(isinstance(m, kinds) for m in module.modules())


def _with_params(module: nn.Module) -> int:
    return sum(any(True for _ in child.parameters()) for child in module.children())


# Families whose parameter names do not show their depth as numbered blocks: the layers their rule should give,
# counted from the built network's own modules.
EXPECTED_LAYERS = {
    "vit_b_16": lambda net: 1 + len(net.encoder.layers),  # stem, then each encoder layer
    "densenet121": lambda net: 1 + _count(net, tvm.densenet._DenseLayer),
    "googlenet": _with_params,  # each top-level conv and inception module
    "inception_v3": _with_params,
    "alexnet": lambda net: _count(net, nn.Conv2d),
    "vgg16": lambda net: _count(net, nn.Conv2d),
    "swin_t": lambda net: 1 + _count(net, tvm.swin_transformer.SwinTransformerBlock, tvm.swin_transformer.PatchMerging),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_families_whose_names_hide_their_depth_split_by_their_blocks(name: str):
    model = _on_meta(name)
    layers = backbone_layers(model)
    assert len(layers) == EXPECTED_LAYERS[name](model.backbone)
    generic = numbered(model.backbone, [n for n, _ in model.trainable_backbone_named()])
    assert len({key for key in generic if key is not None}) != len(layers)  # the numbered rule would split otherwise


def test_torchvision_vit_layers_are_its_encoder_layers():
    layers = backbone_layers(_on_meta("vit_b_16"))
    stem, blocks = layers[0], layers[1:]
    assert {n for n, _ in stem} == {"class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"}
    assert [layer[0][0] for layer in blocks] == [f"encoder.layers.encoder_layer_{i}.ln_1.weight" for i in range(12)]
    assert layers[-1][-1][0] == "encoder.ln.bias"  # the final norm joins the last encoder layer


def test_parameters_that_never_train_are_in_no_layer():
    model = _on_meta("vgg16", frozen_layers=10)
    layers = backbone_layers(model)
    assert len(layers) == 3  # the 13 convs less the 10 kept frozen
    assert not {n for layer in layers for n, _ in layer} & set(model.fixed)


def test_frozen_layers_keep_the_lowest_layers_of_the_split_out_of_training():
    split = [[n for n, _ in layer] for layer in backbone_layers(_on_meta("efficientnet_lite0"))]
    assert split[0] == ["conv_stem.weight", "bn1.weight", "bn1.bias"]  # the stem, then one layer per block
    model = _on_meta("efficientnet_lite0", frozen_layers=4)
    frozen = [n for layer in split[:4] for n in layer]
    assert model.fixed == frozen
    assert [n for n, p in model.backbone.named_parameters() if not p.requires_grad] == frozen
    assert [[n for n, _ in layer] for layer in backbone_layers(model)] == split[4:]


@pytest.mark.parametrize("count", [-1, 17])
def test_frozen_layers_outside_the_split_are_refused_with_the_range(count: int):
    layers = len(backbone_layers(_on_meta("efficientnet_lite0")))
    assert layers == 17
    with pytest.raises(ConfigError, match=f"splits into {layers} layers .* 0 to {layers - 1}"):
        _on_meta("efficientnet_lite0", frozen_layers=count)
