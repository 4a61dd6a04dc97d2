"""Tiny architectures for fast tests, registered only while a test (or a test's subprocess) uses them.

They live outside ``conftest.py`` so that a ``python -c`` child process can register them too
(:data:`TINY_MAIN`) without importing pytest fixtures, and outside the package so that the production
registry never holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from transfer.models import REGISTRY, Architecture, Split, register
from transfer.models.pretrained import scratch


def _tiny_build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1000),
    )


def _tiny_split(net: nn.Module) -> Split:
    net[-1] = nn.Identity()
    return Split(net, None, 8)


def _tiny_neck_build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.Linear(6, 1000),
    )


def _tiny_neck_split(net: nn.Module) -> Split:
    return Split(net[:5], net[5], 6)


TINY_CNN = Architecture(
    name="tiny_test_cnn", family="test", build=_tiny_build, split=_tiny_split, pretrained_cfg=scratch()
)
TINY_NECK = Architecture(
    name="tiny_test_neck", family="test", build=_tiny_neck_build, split=_tiny_neck_split, pretrained_cfg=scratch()
)
TINY_ARCHS = (TINY_CNN, TINY_NECK)

# `python -c TINY_MAIN <overrides>` is `python -m transfer.run <overrides>` with the tiny architectures registered:
# CLI runs (signals, kill -9, exit codes) in a second instead of building a real network.
TINY_MAIN = (
    "import sys; sys.argv[0] = 'transfer.run'; from tests.tiny_models import TINY_ARCHS; "
    "from transfer.models import register; [register(a) for a in TINY_ARCHS]; "
    "from transfer.run import main; main()"
)


@contextmanager
def registered(*archs: Architecture) -> Iterator[None]:
    """Register ``archs`` (default: :data:`TINY_ARCHS`) for the ``with`` block; the registry is restored after it,
    including any entry an architecture of the same name replaced."""
    before = dict(REGISTRY)
    try:
        for arch in archs or TINY_ARCHS:
            register(arch)
        yield
    finally:
        REGISTRY.clear()
        REGISTRY.update(before)
