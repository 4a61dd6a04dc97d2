"""The model factory: one call returns a pretrained backbone, a new head and the metadata transforms need.

An :class:`Architecture` says how to build the ImageNet-shaped network, where its weights live, how to adapt
it to small inputs and where to cut off its classifier. :func:`create_model` runs those steps in the one order
that works: build -> load pretrained tensors -> adapt (new layers are initialised from the loaded ones) ->
split off the backbone -> attach a new head sized to the dataset.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from transfer.errors import ConfigError
from transfer.models.weights import LoadReport, WeightSource, fetch, load_file, load_into

log = logging.getLogger(__name__)

ADAPT_MODES = ("native", "resize")


@dataclass(frozen=True)
class ModelMeta:
    """What the data pipeline and a checkpoint reader need to know about a model.

    Attributes:
        name: registry name (``model=<name>``).
        family: architecture family (resnet, alexnet, efficientnet, ...).
        input_size: the pretrained input resolution in pixels (square).
        mean: per-channel normalisation mean of the pretrained weights.
        std: per-channel normalisation std of the pretrained weights.
        interpolation: resize interpolation the weights were trained with.
        weight_source: where the weights came from (``random`` when not pretrained).
        adapt: ``native`` (small inputs, adapted stem) or ``resize`` (inputs resized to ``input_size``).
        num_features: width of the backbone's output, i.e. the head's input.
    """

    name: str
    family: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weight_source: str
    adapt: str
    num_features: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, for checkpoints and summaries."""
        return asdict(self)


@dataclass(frozen=True)
class Architecture:
    """How to make one registry entry.

    Attributes:
        name: registry name.
        family: architecture family.
        build: returns the ImageNet-shaped network with random weights.
        split: takes the built network, removes its classifier in place and returns
            ``(backbone, num_features)``; the backbone maps images to pooled features.
        weights: where the ImageNet weights live.
        input_size: pretrained resolution.
        mean: normalisation mean.
        std: normalisation std.
        interpolation: resize interpolation.
        adapters: per ``adapt`` mode, an in-place change of the (already pretrained) network.
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    split: Callable[[nn.Module], tuple[nn.Module, int]]
    weights: WeightSource | None
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    adapters: dict[str, Callable[[nn.Module], None]] = field(default_factory=dict)


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry under its name."""
    REGISTRY[arch.name] = arch
    return arch


class TransferModel(nn.Module):
    """``head(backbone(x))`` with the metadata of both.

    Attributes:
        backbone: pretrained part, images -> ``(N, num_features)`` features.
        head: new part, features -> class logits.
        meta: a :class:`ModelMeta`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, meta: ModelMeta) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.meta = meta

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for a batch of normalised images."""
        return self.head(self.backbone(x))


def create_model(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
                 adapt: str = "native", drop_rate: float = 0.0) -> TransferModel:
    """Build a registry model with a new ``num_classes`` head.

    Args:
        name: registry name, e.g. ``resnet18``.
        num_classes: number of classes of the new head.
        pretrained: load ImageNet weights (cache, package or download).
        weights: a local state-dict file to load instead; implies ``pretrained``.
        adapt: ``native`` to adapt the stem to small (32 px) inputs, ``resize`` to keep the architecture
            and resize inputs to its pretrained size.
        drop_rate: dropout before the head's linear layer.

    Returns:
        The :class:`TransferModel`.

    Raises:
        ConfigError: unknown name or adapt mode.
        WeightsUnavailableError: pretrained weights cannot be had.
    """
    arch = REGISTRY.get(name)
    if arch is None:
        raise ConfigError(f"Unknown model {name!r}. Choose one of: {', '.join(sorted(REGISTRY))} "
                          f"(python -m transfer.models lists them).")
    if adapt not in ADAPT_MODES:
        raise ConfigError(f"model.adapt={adapt!r} is not one of {ADAPT_MODES}.")
    net = arch.build()
    source = "random"
    if weights or pretrained:
        report = _load_pretrained(arch, net, weights)
        log.info("%s: %s", name, report.summary())
        source = report.source
    if adapt in arch.adapters:
        arch.adapters[adapt](net)
    backbone, num_features = arch.split(net)
    head: nn.Module = nn.Linear(num_features, num_classes)
    if drop_rate > 0:
        head = nn.Sequential(nn.Dropout(drop_rate), head)
    meta = ModelMeta(name=name, family=arch.family, input_size=arch.input_size, mean=arch.mean, std=arch.std,
                     interpolation=arch.interpolation, weight_source=source, adapt=adapt,
                     num_features=num_features)
    return TransferModel(backbone, head, meta)


def _load_pretrained(arch: Architecture, net: nn.Module, weights: str | None) -> LoadReport:
    if weights:
        return load_into(net, load_file(weights), arch.weights, origin=str(weights))
    if arch.weights is None:
        raise ConfigError(f"Model {arch.name} has no pretrained weights; pass model.pretrained=false "
                          f"or a file with model.weights=PATH.")
    return load_into(net, fetch(arch.weights, arch.name), arch.weights, origin=arch.weights.describe())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
