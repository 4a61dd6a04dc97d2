"""Vision transformers: ViT-B/16 and Swin-T/B (torchvision), DeiT-S/B and BEiT-B (timm), MoCo v3 ViT-B.

They are pretrained at 224 px, so ``adapt=resize`` (upsample inputs) is their default. ``adapt=native``
runs them on 32 px directly:

* ViT / DeiT / BEiT: patch size 16 -> 4 (an 8x8 grid, 64 tokens), the patch embedding resampled from the
  16x16 one and the position embedding resampled bicubically with timm's ``resample_abs_pos_embed`` (class
  token kept). torchvision's ViT uses :func:`~transfer.models.adapt.resample_kernel`, which gives exactly the
  tokens the pretrained embedding produces on a 4x nearest-upsampled image; timm models use timm's own
  ``set_input_size`` (which keeps every prefix token, e.g. DeiT's distillation token).
* Swin: the 4x4 patch embedding stays (8x8 tokens); each stage's window becomes the largest size <= 7 that
  divides its map (4, 4, 2, 1) with the relative-position tables resized bicubically to match (timm's
  ``resize_rel_pos_bias_table_simple``: torchvision stores the table in the same ``((2w-1)^2, heads)`` layout).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import timm
import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.swin_transformer import ShiftedWindowAttention

from transfer.models.adapt import conv_at, expect, resample_kernel, swap
from transfer.models.core import Architecture, Split, register
from transfer.models.layers import SWIN, TORCHVISION_VIT, timm_layers
from transfer.models.pretrained import scratch
from transfer.models.sources import timm_cfg, timm_split, torchvision_cfg
from transfer.models.weights import WeightSource

NATIVE_SIZE, NATIVE_PATCH = 32, 4


def _tv_vit_split(net: nn.Module) -> Split:
    width = expect(list(net.get_submodule("heads").children())[-1], nn.Linear).in_features
    swap(net, "heads", nn.Identity())  # the forward then returns the final class-token embedding
    return Split(net, None, width)


def _tv_vit_native(net: nn.Module) -> None:
    vit = expect(net, tvm.VisionTransformer)
    old = conv_at(vit, "conv_proj")
    new = nn.Conv2d(old.in_channels, old.out_channels, NATIVE_PATCH, stride=NATIVE_PATCH)
    grid = NATIVE_SIZE // NATIVE_PATCH
    with torch.no_grad():
        new.weight.copy_(resample_kernel(old.weight, NATIVE_PATCH))
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
        # torchvision's layout is timm's: (1, 1 + g*g, D) with the class token first.
        vit.encoder.pos_embedding = nn.Parameter(
            resample_abs_pos_embed(vit.encoder.pos_embedding, [grid, grid], num_prefix_tokens=1)
        )
    vit.conv_proj = new
    vit.image_size, vit.patch_size, vit.seq_length = NATIVE_SIZE, NATIVE_PATCH, grid * grid + 1


def _swin_split(net: nn.Module) -> Split:
    width = expect(net.get_submodule("head"), nn.Linear).in_features
    swap(net, "head", nn.Identity())
    return Split(net, None, width)


def _swin_native(net: nn.Module) -> None:
    size = NATIVE_SIZE // 4  # the 4x4 patch embedding is kept
    features = expect(net.get_submodule("features"), nn.Sequential)
    for stage in features[1::2]:  # features: patch embed, stage, merge, stage, merge, ...
        window = max(d for d in range(1, 8) if size % d == 0)
        for block in stage.children():
            attn = expect(block.get_submodule("attn"), ShiftedWindowAttention)
            shifted = any(attn.shift_size)
            attn.window_size = [window, window]
            attn.shift_size = [window // 2 if shifted and window < size else 0] * 2
            table = attn.relative_position_bias_table
            # timm's "simple" resize (bicubic over the (2w-1)x(2w-1) offset grid); its plain
            # resize_rel_pos_bias_table is BEiT's geometric resampling, made for growing windows.
            with torch.no_grad():
                attn.relative_position_bias_table = nn.Parameter(
                    resize_rel_pos_bias_table_simple(table, (window, window), ((2 * window - 1) ** 2, table.shape[1]))
                )
            attn.define_relative_position_index()
        size = max(1, (size + 1) // 2)


def _timm_native(net: nn.Module) -> None:
    if not isinstance(net, (VisionTransformer, Beit)):
        raise TypeError(f"expected a timm VisionTransformer or Beit, got a {type(net).__name__}")
    net.set_input_size(img_size=(NATIVE_SIZE, NATIVE_SIZE), patch_size=(NATIVE_PATCH, NATIVE_PATCH))


def _moco_convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official MoCo v3 checkpoints hold ``module.base_encoder.*`` (the ViT), a momentum encoder and a
    predictor; keep the base encoder under timm's names and drop its projection head (ours is new)."""
    prefix = "module.base_encoder."
    if not any(k.startswith(prefix) for k in state):
        return state  # already a plain ViT state dict
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in encoder.items() if not k.startswith("head.")}


# Transformers keep their pretrained geometry: auto always feeds the unmodified network, inputs resized.
RESIZE = "resize"

register(
    Architecture(
        name="vit_b_16",
        family="vit",
        build=lambda: tvm.vit_b_16(weights=None),
        split=_tv_vit_split,
        classifier="heads.",
        adapters={"native": _tv_vit_native},
        pretrained_cfg=torchvision_cfg(tvm.ViT_B_16_Weights.IMAGENET1K_V1, auto_adapt=RESIZE),
        layers=TORCHVISION_VIT,
    )
)

for _name, _ctor, _weights in (
    ("swin_t", tvm.swin_t, tvm.Swin_T_Weights.IMAGENET1K_V1),
    ("swin_b", tvm.swin_b, tvm.Swin_B_Weights.IMAGENET1K_V1),
):
    register(
        Architecture(
            name=_name,
            family="swin",
            build=partial(_ctor, weights=None),
            split=_swin_split,
            classifier="head.",
            adapters={"native": _swin_native},
            pretrained_cfg=torchvision_cfg(_weights, auto_adapt=RESIZE),
            layers=SWIN,
        )
    )

for _name, _tag in (
    ("deit_small", "deit_small_patch16_224.fb_in1k"),
    ("deit_base", "deit_base_patch16_224.fb_in1k"),
    ("beit_base", "beit_base_patch16_224.in22k_ft_in22k_in1k"),
):
    register(
        Architecture(
            name=_name,
            family=_name.split("_")[0],
            build=partial(timm.create_model, _tag.split(".")[0], pretrained=False),
            split=timm_split,
            classifier="head.",
            adapters={"native": _timm_native},
            pretrained_cfg=timm_cfg(_tag, auto_adapt=RESIZE),
            layers=timm_layers,
        )
    )

# Neither library describes the MoCo v3 checkpoint; its repository's linear-probe eval (main_lincls.py) is the
# standard ImageNet one: Resize(256), CenterCrop(224), ImageNet mean/std, bilinear, which are timm's defaults.
_MOCO_CFG = dataclasses.replace(
    scratch(224),
    source=WeightSource("url", "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"),
    auto_adapt=RESIZE,
)

register(
    Architecture(
        name="mocov3_vit_base",
        family="vit",
        build=lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
        split=timm_split,
        pretrained_cfg=_MOCO_CFG,
        classifier="head.",
        convert=_moco_convert,
        adapters={"native": _timm_native},
        layers=timm_layers,
    )
)
