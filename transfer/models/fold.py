"""BatchNorm folded into the convolution before it: the same function in fewer passes over memory, for inference.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` is one convolution with scaled weights
and a shifted bias. On a CPU the norm is a memory-bound pass over every feature map: for EfficientNet-Lite0 at
64 px it is about a quarter of an eval forward (py-spy of a budgeted run, docs/speed-and-scale.md). The pairs are
found by running the model once with hooks (a norm whose input *is* a convolution's output), not from module
names, so every family is served by one rule; the folded copy is then checked against the original on that
input and discarded if they differ (a convolution whose output also feeds something else).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# The folded copy must give the original's logits, within this fraction of the largest: float32 reassociation stays
# far below 1e-3; weights held in a 16-bit type (trainer.precision=bf16-true) round at about 1e-2 per layer.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_HALF_TOLERANCE = 5e-2
_refused: set[str] = set()  # the architectures whose folding was refused, each said once


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, every submodule's own mode put back after (a frozen BatchNorm stays in eval)."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield model.eval()
    finally:
        for module, training in modes.items():
            module.training = training


def _foldable_norm(module: nn.Module) -> bool:
    """A BatchNorm2d whose forward is the norm alone, or timm's norm + dropout + activation (BatchNormAct2d)."""
    if not isinstance(module, nn.BatchNorm2d) or module.running_mean is None or module.running_var is None:
        return False
    return type(module) is nn.BatchNorm2d or type(module).__name__ == "BatchNormAct2d"


def conv_norm_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """The ``(conv name, norm name)`` pairs where the norm's input is the convolution's output, in one forward pass.

    Args:
        model: the network (in any mode; it runs once in eval mode under ``no_grad`` and is put back).
        example: an input batch it takes.

    Returns:
        The pairs, in the order the forward pass reaches them; each convolution and each norm at most once.
    """
    names = {module: name for name, module in model.named_modules()}
    # id of a conv's output -> (the output, kept so that its id is not reused during the pass; the conv)
    outputs: dict[int, tuple[Tensor, nn.Module]] = {}
    pairs: list[tuple[str, str]] = []
    seen: set[nn.Module] = set()

    def after_conv(module: nn.Module, args: tuple, output: Tensor) -> None:
        outputs[id(output)] = (output, module)

    def before_norm(module: nn.Module, args: tuple) -> None:
        conv = outputs.pop(id(args[0]), (None, None))[1] if args else None
        if conv is not None and conv not in seen and module not in seen and _foldable_norm(module):
            seen.update((conv, module))
            pairs.append((names[conv], names[module]))

    hooks = [
        *(m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)),
        *(m.register_forward_pre_hook(before_norm) for m in model.modules() if isinstance(m, nn.BatchNorm2d)),
    ]
    try:
        with torch.no_grad(), _evaluating(model):
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Scale ``conv``'s weights and shift its bias so that it computes ``norm(conv(x))`` in eval mode."""
    assert norm.running_var is not None and norm.running_mean is not None
    scale = torch.rsqrt(norm.running_var.float() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.float()
    shift = -norm.running_mean.float() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    weight = conv.weight.float() * scale.reshape(-1, *([1] * (conv.weight.ndim - 1)))
    bias = shift if conv.bias is None else conv.bias.float() * scale + shift
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _after_norm(norm: nn.Module) -> nn.Module:
    """What is left of a folded norm: nothing, or timm BatchNormAct2d's dropout and activation."""
    rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm(model: nn.Module, example: Tensor) -> nn.Module:
    """``model`` for inference with each BatchNorm that follows a convolution folded into it.

    Args:
        model: the network (not changed).
        example: an input batch it takes (two images are enough): the pairs are found and the result checked on it.

    Returns:
        A folded copy in eval mode, parameters without gradients; ``model`` itself (its mode unchanged) when
        nothing folds or the copy's logits differ from the original's by more than a float rounding.
    """
    # Outside autocast (an evaluation under mixed precision calls this): the check compares the two at full width.
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(example.device.type, enabled=False):
        example = example.clone()  # an inference-mode batch cannot enter the hooks' bookkeeping otherwise
        pairs = conv_norm_pairs(model, example)
        if not pairs:
            return model
        folded = copy.deepcopy(model).eval()
        for conv_name, norm_name in pairs:
            _fold_into(folded.get_submodule(conv_name), folded.get_submodule(norm_name))  # type: ignore[arg-type]
            _replace(folded, norm_name, _after_norm(folded.get_submodule(norm_name)))
        folded.requires_grad_(False)
        with _evaluating(model):
            reference = model(example)
        error = (folded(example).float() - reference.float()).abs().max().item()
        tolerance = _TOLERANCE.get(reference.dtype, _HALF_TOLERANCE) * max(1.0, reference.abs().max().item())
        if error > tolerance:
            name = type(model).__name__
            if name not in _refused:
                _refused.add(name)
                log.info("BatchNorm folding changed %s's logits by %.3g: it is evaluated as it is", name, error)
            return model
    return folded
