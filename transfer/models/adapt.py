"""Adapting ImageNet architectures to small inputs (CIFAR's 32 px) without throwing the pretrained stem away."""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def expect(module: nn.Module, kind: type[ModuleT]) -> ModuleT:
    """``module`` as a ``kind``, for an adapter that only fits one architecture (anything else is a bug)."""
    if not isinstance(module, kind):
        raise TypeError(f"expected a {kind.__name__}, got a {type(module).__name__}")
    return module


def conv_at(net: nn.Module, path: str) -> nn.Conv2d:
    """The ``nn.Conv2d`` at dotted ``path`` inside ``net``."""
    return expect(net.get_submodule(path), nn.Conv2d)


def swap(net: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at dotted ``path`` is (``features.0`` works for an ``nn.Sequential``)."""
    parent, _, name = path.rpartition(".")
    (net.get_submodule(parent) if parent else net).add_module(name, new)


def resample_kernel(weight: Tensor, size: int) -> Tensor:
    """Shrink conv kernels ``(out, in, k, k)`` to ``(out, in, size, size)``, keeping what they respond to.

    Each new tap is the average of the pretrained taps it covers (area resampling), scaled by
    ``(k / size)**2`` so that the response to a constant image is the same as before. A 7x7 stem kernel
    looks at a region about 7x bigger than the object detail CIFAR's 32 px images have, so a shrunken
    copy of it is a far better start than random weights (or than its centre 3x3 alone, which keeps
    only a small fraction of the kernel's mass).

    Kept hand-written: timm's ``resample_patch_embed`` does another job. Its pseudo-inverse (FlexiViT)
    resize matches the tokens of *bicubically* resized patches (it gives other kernels: max difference 11.8
    on a random 16x16 -> 4x4 kernel), and timm 1.0.31 raises for ``interpolation="nearest"``. The area sums
    here give exactly the tokens of a 4x nearest-upsampled image (tests/models/test_zoo_weights.py), and
    they also shrink CNN stems, which are not patch embeddings.

    Args:
        weight: pretrained kernels.
        size: new spatial size.

    Returns:
        The resampled kernels.
    """
    k = weight.shape[-1]
    return F.adaptive_avg_pool2d(weight, size) * (k * k) / (size * size)


def shrink_conv(conv: nn.Conv2d, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """A ``kernel_size``/``stride`` copy of ``conv`` with 'same' padding and kernels resampled from it."""
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(resample_kernel(conv.weight, kernel_size))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def reduce_strides(module: nn.Module, count: int) -> list[str]:
    """Set the first ``count`` stride-2 convolutions (in module order) to stride 1.

    Mobile and EfficientNet families downsample 32x overall, which turns a 32 px image into a 1x1 map;
    undoing the stem's stride (and optionally the next one) keeps a 2x2 (4x4) map. A 3x3 or 5x5 conv keeps
    its padding, and timm's ``Conv2dSame`` recomputes its padding from the stride, so pretrained kernels
    fit unchanged.

    Args:
        module: the network.
        count: how many stride-2 convs to change.

    Returns:
        The names of the changed convs.
    """
    changed: list[str] = []
    for name, conv in module.named_modules():
        if len(changed) == count:
            break
        if isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (2, 2):
            conv.stride = (1, 1)
            changed.append(name)
    return changed
