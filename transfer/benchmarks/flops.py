"""How much of the device a training step uses: the model's FLOPs per image against the device's measured peak.

Images/s alone cannot say whether a step is slow because the model is large or because the framework leaves
the device idle. Multiplying it by the FLOPs one training image costs (forward and backward, counted by
PyTorch's own :class:`~torch.utils.flop_counter.FlopCounterMode`) gives the FLOP/s the step achieves; dividing
that by what the device reaches on one large matrix product in the same precision gives the share of the peak
the step uses (model FLOPs utilisation). The peak is measured rather than taken from a data sheet: a shared CPU
or a power-capped card runs below its nominal figure, and the share should say what this machine could do.
"""

from __future__ import annotations

import math
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_image(model: nn.Module, images: Tensor) -> float:
    """FLOPs of one forward and backward pass per image (matrix products and convolutions, as PyTorch counts them).

    The model's gradients are cleared afterwards, and its mode is left as it was.

    Args:
        model: the network, on the device of ``images``.
        images: a batch shaped as training feeds it (its size only scales the count).

    Returns:
        The counted FLOPs divided by the batch size.
    """
    custom = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(images).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def _conv_backward_flops(  # aten.convolution_backward's arguments, tensors given by their shapes
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    **_: Any,
) -> int:
    """A convolution's backward: each gradient it computes (into its input, into its weight) costs its forward.

    Every weight element meets ``batch x output positions`` inputs in both gradients as in the forward (input
    positions for a transposed convolution). torch's own count of the weight gradient ignores the groups, counting
    every input channel against every output channel: a depthwise convolution's came out channels-times too high
    (EfficientNet-Lite0 at 80 px: 4.8 GFLOP per training image, against 0.11 for its forward).
    """
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    forward = 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)
    return forward * sum(map(bool, output_mask[:2]))  # the third is the bias's: a sum, not counted


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """The best FLOP/s of ``repeats`` timed square matrix products: the device's reachable peak in ``dtype``.

    Args:
        device: where to multiply.
        dtype: the precision (``torch.bfloat16`` for bf16-mixed training, ``torch.float32`` otherwise).
        size: the side of the matrices; ``None``: 8192 on a GPU (large enough to fill an H100), 2048 on a CPU.
        repeats: timed products after one warm-up; the fastest counts.

    Returns:
        ``2 * size**3`` divided by the fastest product's seconds.
    """
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first product pays for kernel selection and page faults
            best = min(best, perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
