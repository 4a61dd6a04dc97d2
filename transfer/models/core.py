"""The model factory: one call returns a pretrained backbone, a new head and the metadata transforms need.

An :class:`Architecture` says how to build the ImageNet-shaped network, where its weights live, how to adapt
it to small inputs and where to cut off its classifier. :func:`create_model` runs those steps in the one order
that works: build -> load pretrained tensors -> adapt (new layers are initialised from the loaded ones) ->
split off the backbone -> attach a new head sized to the dataset.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

from torch import Tensor, nn

from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess
from transfer.models.pretrained import PretrainedCfg
from transfer.models.weights import LoadReport, fetch, load_file, load_into

log = logging.getLogger(__name__)

ADAPT_MODES = ("native", "resize")
# A family's layer split (transfer.models.layers): given the backbone and its parameter names in module order, one
# layer key per name (``None``: the same layer as the name before it).
LayerRule = Callable[[nn.Module, list[str]], list[Hashable | None]]


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
        crop_pct: the pretrained eval centre crop's share of the resized side (``input_size / resize_size``).
        weight_source: where the weights came from (``random`` when not pretrained).
        adapt: ``native`` (small inputs, adapted stem) or ``resize`` (inputs resized to ``input_size``).
        num_features: width of the backbone's output, i.e. the head's input.
        small_input_size: for small-image data (CIFAR's 32 px), the side to upsample to and feed the unmodified
            network (``None``: adapt the stem and keep the data's own size instead).
    """

    name: str
    family: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    weight_source: str
    adapt: str
    num_features: int
    small_input_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, for checkpoints and summaries."""
        return asdict(self)


class Split(NamedTuple):
    """A network cut where its ImageNet classifier was.

    Attributes:
        backbone: images -> features (the part staged fine-tuning freezes).
        neck: pretrained layers between backbone and head (AlexNet/VGG's fc6/fc7), trained with the head
            from the start because the adapted backbone feeds them new features; ``None`` when absent.
        num_features: width of the features the head receives.
    """

    backbone: nn.Module
    neck: nn.Module | None
    num_features: int


@dataclass(frozen=True)
class Architecture:
    """How to make one registry entry.

    Attributes:
        name: registry name.
        family: architecture family.
        build: returns the ImageNet-shaped network with random weights.
        split: takes the built network, removes its classifier and returns a :class:`Split`.
        pretrained_cfg: the weights' source, input, crop and normalisation, and the ``adapt=auto`` rule.
        classifier: name prefix of the ImageNet classifier's tensors, which a weight file may lack
            (e.g. self-supervised checkpoints) because the head is replaced anyway.
        adapters: per ``adapt`` mode, an in-place change of the (already pretrained) network.
        convert: maps a foreign checkpoint layout (e.g. MoCo v3's) onto this architecture's names.
        layers: how the backbone splits into layers for layer-wise lr decay, where its parameter names alone do
            not tell (``None``: the numbered-block rule, :func:`transfer.models.layers.numbered`).
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    split: Callable[[nn.Module], Split]
    pretrained_cfg: PretrainedCfg
    classifier: str = ""
    adapters: dict[str, Callable[[nn.Module], None]] = field(default_factory=dict)
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    layers: LayerRule | None = None


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry under its name.

    A name that is already taken is replaced with a warning, as timm's registry does: replacing a built-in on
    purpose (e.g. a patched ``resnet18``) stays possible, while two zoos that pick the same name by accident
    no longer shadow each other silently.

    Args:
        arch: the architecture; ``arch.name`` is its key.

    Returns:
        ``arch``, so the call can wrap a definition.
    """
    if arch.name in REGISTRY and REGISTRY[arch.name] is not arch:
        warnings.warn(
            f"Model {arch.name!r} is already registered (family {REGISTRY[arch.name].family}); "
            f"the new definition replaces it.",
            UserWarning,
            stacklevel=2,
        )
    REGISTRY[arch.name] = arch
    return arch


class TransferModel(nn.Module):
    """``head(neck(backbone(x)))`` with the metadata of all three.

    Attributes:
        backbone: pretrained part that staged fine-tuning freezes first.
        neck: pretrained layers trained with the head from the start (``nn.Identity`` when the family has none).
        head: new part, features -> class logits.
        meta: a :class:`ModelMeta`.
        fixed: names of backbone parameters that never train (``model.frozen_layers``; e.g. VGG16's first 10
            convs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        meta: ModelMeta,
        neck: nn.Module | None = None,
        fixed: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.head = head
        self.meta = meta
        self.fixed: list[str] = []
        self.fix(fixed or [])

    def fix(self, names: list[str]) -> None:
        """Keep the backbone parameters ``names`` at their weights for good: no gradient, in no param group."""
        self.fixed += [name for name in names if name not in self.fixed]
        for name, p in self.backbone.named_parameters():
            if name in self.fixed:
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for a batch of normalised images."""
        return self.head(self.neck(self.backbone(x)))

    def features(self, x: Tensor) -> Tensor:
        """What the head sees: pooled backbone features passed through the neck."""
        return self.neck(self.backbone(x))

    def trainable_backbone_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters that staged fine-tuning may unfreeze (all but ``fixed``)."""
        return [p for _, p in self.trainable_backbone_named()]

    def trainable_backbone_named(self) -> list[tuple[str, nn.Parameter]]:
        """:meth:`trainable_backbone_parameters` with their names inside the backbone, in module order."""
        fixed = set(self.fixed)
        return [(n, p) for n, p in self.backbone.named_parameters() if n not in fixed]

    def layer_split(self) -> list[list[tuple[str, nn.Parameter]]]:
        """The trainable backbone in layers, stem first, by the family's rule (layer-wise lr decay's groups)."""
        from transfer.models.layers import backbone_layers  # layers.py builds on this module

        return backbone_layers(self)


def resolve_adapt(name: str, adapt: str, image_size: int | None, native_size: int | None = None) -> str:
    """Turn ``model.adapt=auto`` into ``native`` or ``resize``, by the model's own rule.

    Args:
        name: registry name.
        adapt: ``auto``, ``native`` or ``resize`` (the last two are returned as they are).
        image_size: ``data.image_size``, or ``None`` to let the model decide.
        native_size: the data's own side (32 for CIFAR-10), ``None`` for photos of any size.

    Returns:
        What :meth:`PretrainedCfg.resolve_auto` says: for CNNs ``native`` when the model will be fed fewer than
        :data:`~transfer.models.pretrained.AUTO_NATIVE_BELOW` px (``image_size``, else its small-input size, the
        data's own or the pretrained size, in that order), ``resize`` (the unmodified network) otherwise; for
        transformers always ``resize``.
        An unknown name gives ``native`` (:func:`create_model` then names the known ones).
    """
    if adapt != "auto":
        return adapt
    arch = REGISTRY.get(name)
    return arch.pretrained_cfg.resolve_auto(image_size, native_size) if arch is not None else "native"


def architecture(name: str) -> Architecture:
    """The registry entry ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    arch = REGISTRY.get(name)
    if arch is None:
        raise ConfigError(
            f"Unknown model {name!r}. Choose one of: {', '.join(sorted(REGISTRY))} "
            f"(python -m transfer.models lists them)."
        )
    return arch


def model_preprocess(
    name: str, adapt: str = "auto", image_size: int | None = None, native_size: int | None = None
) -> Preprocess:
    """The input a registry model's weights expect, decided from the registry alone (nothing built or fetched).

    This is what torchvision's ``Weights.transforms()`` and timm's ``resolve_data_config`` give: the model's
    weights own their preprocessing, and a run hands the result to the data module's constructor.

    Args:
        name: registry name.
        adapt: ``model.adapt`` (``auto`` is resolved as :func:`resolve_adapt` does).
        image_size: ``data.image_size``; ``None`` lets the model decide.
        native_size: the data's own side (32 for CIFAR-10), ``None`` for photos of any size.

    Returns:
        The :class:`~transfer.core.preprocess.Preprocess` (size, mean/std, interpolation, the weights' crop).
    """
    cfg = architecture(name).pretrained_cfg
    spec = SimpleNamespace(
        input_size=cfg.input_size,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        small_input_size=cfg.small_input_size,
        adapt=resolve_adapt(name, adapt, image_size, native_size),
    )
    return resolve_preprocess(spec, image_size, native_size)


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights: str | None = None,
    adapt: str = "auto",
    drop_rate: float = 0.0,
    frozen_layers: int = 0,
) -> TransferModel:
    """Build a registry model with a new ``num_classes`` head.

    Args:
        name: registry name, e.g. ``resnet18``.
        num_classes: number of classes of the new head.
        pretrained: load ImageNet weights (cache, package or download).
        weights: a local state-dict file to load instead; implies ``pretrained``.
        adapt: ``native`` to adapt the stem to small (32 px) inputs, ``resize`` to keep the architecture
            and resize inputs to its pretrained size, ``auto`` for the model's rule at its pretrained size (a run
            calls :func:`resolve_adapt` with its input size first and passes the result).
        drop_rate: dropout before the head's linear layer.
        frozen_layers: keep the backbone's lowest ``frozen_layers`` layers (its layer split, stem first:
            :func:`transfer.models.layers.backbone_layers`) at their weights for the whole run, as fastai's
            ``freeze_to``. No gradient flows into them, so backpropagation stops above them: the high-resolution
            low layers are the costly end of a step (VGG16's first 10 convs: generic filters need no tuning).

    Returns:
        The :class:`TransferModel`.

    Raises:
        ConfigError: unknown name or adapt mode.
        WeightsUnavailableError: pretrained weights cannot be had.
    """
    arch = architecture(name)
    adapt = resolve_adapt(name, adapt, None)
    if adapt not in ADAPT_MODES:
        raise ConfigError(f"model.adapt={adapt!r} is not one of {(*ADAPT_MODES, 'auto')}.")
    net = arch.build()
    source = "random"
    if weights or pretrained:
        report = _load_pretrained(arch, net, weights)
        log.info("%s: %s", name, report.summary())
        source = report.source
    if adapt in arch.adapters:
        arch.adapters[adapt](net)
    backbone, neck, num_features = arch.split(net)
    head: nn.Module = nn.Linear(num_features, num_classes)
    if drop_rate > 0:
        head = nn.Sequential(nn.Dropout(drop_rate), head)
    cfg = arch.pretrained_cfg
    meta = ModelMeta(
        name=name,
        family=arch.family,
        input_size=cfg.input_size,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        weight_source=source,
        adapt=adapt,
        num_features=num_features,
        small_input_size=cfg.small_input_size,
    )
    model = TransferModel(backbone, head, meta, neck=neck)
    model.fix(_lowest_layers(model, frozen_layers))
    return model


def _lowest_layers(model: TransferModel, count: int) -> list[str]:
    """Names of the parameters in the backbone's lowest ``count`` layers; refuses a count the split cannot give."""
    if count == 0:
        return []
    from transfer.models.layers import backbone_layers  # layers.py builds on this module

    layers = backbone_layers(model)
    if not 0 < count < len(layers):
        raise ConfigError(
            f"model.frozen_layers={count}: {model.meta.name}'s backbone splits into {len(layers)} layers (stem "
            f"first), so 0 to {len(layers) - 1} of them can stay frozen while the rest trains. Pass a count in "
            f"that range, or finetune.unfreeze_at_epoch=null to keep the whole backbone frozen (a linear probe)."
        )
    return [name for layer in layers[:count] for name, _ in layer]


def _load_pretrained(arch: Architecture, net: nn.Module, weights: str | None) -> LoadReport:
    if weights:
        state, origin = load_file(weights), str(weights)
    elif arch.pretrained_cfg.source is None:
        raise ConfigError(
            f"Model {arch.name} has no pretrained weights; pass model.pretrained=false "
            f"or a file with model.weights=PATH."
        )
    else:
        source = arch.pretrained_cfg.source
        state, origin = fetch(source, arch.name), source.describe()
    if arch.convert is not None:
        state = arch.convert(state)
    return load_into(net, state, arch.pretrained_cfg.source, origin=origin, optional=arch.classifier)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def resolve_preprocess(meta: Any, image_size: int | None, native_size: int | None) -> Preprocess:
    """Decide the model's input size and normalisation.

    Args:
        meta: a :class:`~transfer.models.ModelMeta` (mean, std, interpolation, crop_pct, input_size, adapt).
        image_size: ``data.image_size``; ``None`` picks the default below.
        native_size: the dataset's own size (32 for CIFAR-10), or ``None`` for photos of any size.

    Returns:
        The :class:`Preprocess`. Default size: the data's native size for ``adapt=native`` (when it has one), the
        model's small-input size for small data fed to the unmodified network, the pretrained size otherwise.
    """
    if image_size is None:
        small = getattr(meta, "small_input_size", None)
        if native_size and meta.adapt == "native":
            image_size = native_size
        elif native_size and small and native_size < small:
            image_size = small
        else:
            image_size = meta.input_size
    if int(image_size) < 8:
        raise ConfigError(f"data.image_size={image_size} is too small; use 32 (CIFAR's own size) or more.")
    return Preprocess(
        int(image_size),
        tuple(meta.mean),
        tuple(meta.std),
        meta.interpolation,
        crop_pct=float(meta.crop_pct),
        native_size=native_size,
    )
