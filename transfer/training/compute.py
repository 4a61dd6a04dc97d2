"""How a run uses its device: memory format, compilation, and the precision ``auto`` stands for.

Channels-last (NHWC) is on by default: oneDNN's and cuDNN's convolution kernels are fastest in that layout, and in
side-by-side training-step timings of ResNet-18 and EfficientNet-Lite0 on a CPU it was never the slower layout
(the figures are in ``docs/speed-and-scale.md``). bf16 autocast on a CPU speeds up plain convnets but slows the
depthwise convolutions of the mobile families, so ``precision=auto`` keeps a CPU at fp32 (pass
``trainer.precision=bf16-mixed`` for a ResNet). On a GPU ``auto`` is bf16 autocast where the card supports it
(Ampere and newer: no loss scaling to go wrong) and fp16 with a loss scaler before that.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from transfer.core.errors import ConfigError

log = logging.getLogger(__name__)


def uses_gpu(accelerator: str | None) -> bool:
    """Whether a Trainer with this ``accelerator`` would run on a CUDA GPU."""
    return accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())


def resolve_precision(precision: Any, accelerator: str | None) -> Any:
    """``auto`` -> the fastest safe precision for the device (see the module docstring); others pass through."""
    if str(precision) != "auto":
        return precision
    if uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads: ``num_threads``, or one per core this process may run on.

    The default follows the CPU affinity (``taskset``, cgroup cpusets, SLURM's ``--cpus-per-task``) rather than
    the machine's core count, so a job confined to 2 of 64 cores does not start 64 threads that fight over 2.
    Oversubscription is what makes shared CPUs slow: two runs with 2 threads each on 2 cores measured several
    times slower than with 1 thread each, so give concurrent jobs ``compute.num_threads`` that add up to the
    cores (README "Speed and scale").

    Args:
        num_threads: threads, or ``None`` for the affinity's core count.

    Returns:
        The number of threads set.
    """
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"compute.num_threads={num_threads}: use 1 or more, or null for one per available core.")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(num_threads or available)
    torch.set_num_threads(threads)
    return threads


def apply_compute(
    model: nn.Module,
    channels_last: bool = True,
    compile: bool = False,
    compile_mode: str | None = None,
    num_threads: int | None = None,
) -> nn.Module:
    """Put ``model`` in the configured memory format and optionally compile its forward, in place.

    ``nn.Module.compile`` keeps parameter names (``torch.compile(model)`` would prefix them with
    ``_orig_mod.``), so checkpoints stay loadable without compilation.

    Args:
        model: the network (the classifier's ``TransferModel``).
        channels_last: NHWC weights; inputs from the batched augmentation are NHWC already.
        compile: ``torch.compile`` the forward (first steps are slow while it compiles; pays off on long runs
            and GPUs, rarely on a short CPU run).
        compile_mode: ``default``, ``reduce-overhead`` or ``max-autotune``.
        num_threads: CPU threads (:func:`configure_threads`).

    Returns:
        The same ``model``.
    """
    configure_threads(num_threads)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        if not hasattr(model, "compile"):
            raise ConfigError("compute.compile=true needs torch >= 2.2 (nn.Module.compile).")
        model.compile(mode=compile_mode)
        log.info("model compiled (mode=%s)", compile_mode or "default")
    return model


def pick_device(name: str) -> torch.device:
    """The device an inference tool (predict, evaluate) runs on.

    Args:
        name: ``auto`` (the GPU when there is one, else the CPU) or any torch device name (``cpu``, ``cuda:1``).

    Returns:
        The torch device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
