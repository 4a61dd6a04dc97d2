"""What one zoo entry's pretrained weights expect, in one frozen object per model.

torchvision's ``Weights.transforms()`` and timm's ``pretrained_cfg`` describe the same things: the crop the
network saw, the side images were resized to before that crop, the interpolation and the normalisation.
:class:`PretrainedCfg` holds them together with where the weights live and how ``model.adapt=auto`` resolves
for that network; :mod:`transfer.models.sources` fills it from the libraries' own metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from transfer.models.weights import WeightSource

# model.adapt=auto for a network whose stem can be adapted: the adapted (stride-reduced) stem below this input size,
# the unmodified network from it on. Chosen by the 64 px vs 32 px proxy in docs/recipe.md (the unmodified network
# at 64 px tied the adapted stem at 32 px at about the same compute per image and keeps the pretrained stem), and
# because at 128 px and above an adapted stem costs 4x the compute for photos the pretrained strides were made for.
AUTO_NATIVE_BELOW = 64
# How model.adapt=auto resolves: by the input size (see AUTO_NATIVE_BELOW), or always the unmodified network
# (transformers, whose patch and position geometry a 32 px input does not fit without resampling).
AUTO_RULES = ("by_size", "resize")


@dataclass(frozen=True)
class PretrainedCfg:
    """The input a model's pretrained weights expect, where they live, and its ``adapt=auto`` rule.

    Attributes:
        source: where the weights live; ``None`` for a network that is only trained from scratch.
        input_size: the side of the (square) crop the weights were evaluated on.
        resize_size: the side (shorter edge) images were resized to before that centre crop.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: resize interpolation (``bilinear``, ``bicubic``, ``nearest``).
        auto_adapt: how ``model.adapt=auto`` resolves: ``by_size`` (the adapted stem below
            :data:`AUTO_NATIVE_BELOW` px, the unmodified network from there on) or ``resize`` (always the unmodified
            network, inputs resized).
        small_input_size: for small-image data (CIFAR's 32 px) with ``auto``, the side to upsample to and feed the
            unmodified network (``None``: keep the data's own size, which adapts the stem).
    """

    source: WeightSource | None
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    auto_adapt: str = "by_size"
    small_input_size: int | None = None

    def __post_init__(self) -> None:
        if self.auto_adapt not in AUTO_RULES:
            raise ValueError(f"auto_adapt={self.auto_adapt!r} is not one of {AUTO_RULES}")
        if min(self.input_size, self.resize_size) < 1:
            raise ValueError(f"input_size={self.input_size} and resize_size={self.resize_size} must be positive")

    @property
    def crop_pct(self) -> float:
        """The centre crop's share of the resized side (``input_size / resize_size``)."""
        return self.input_size / self.resize_size

    def resolve_auto(self, image_size: int | None, native_size: int | None) -> str:
        """What ``model.adapt=auto`` means for this model.

        Args:
            image_size: ``data.image_size``, or ``None`` to let the model decide.
            native_size: the data's own side (32 for CIFAR-10), ``None`` for photos of any size.

        Returns:
            ``native`` or ``resize``. With ``by_size``, the side the model will be fed decides: ``image_size``, else
            (small data) its small-input size or the data's own, else (photos) the pretrained size.
        """
        if self.auto_adapt == "resize":
            return "resize"
        size = image_size or ((self.small_input_size or native_size) if native_size else self.input_size)
        return "native" if size < AUTO_NATIVE_BELOW else "resize"


def resize_for(input_size: int, crop_pct: float) -> int:
    """The side to resize to before a ``crop_pct`` centre crop of ``input_size``, rounded down as timm's
    ``create_transform`` rounds it (so a timm ``crop_pct`` gives timm's own eval resize)."""
    return math.floor(input_size / crop_pct)


def scratch(
    input_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> PretrainedCfg:
    """The config of a network without pretrained weights.

    No weights means no recipe of their own, so it takes timm's defaults for an ImageNet-shaped network: ImageNet's
    statistics and the 0.875 centre crop.

    Args:
        input_size: the side the network is built for.
        mean: normalisation mean (e.g. the training data's own statistics).
        std: normalisation std.
        crop_pct: the eval centre crop's share of the resized side, for photos.
    """
    return PretrainedCfg(None, input_size, resize_for(input_size, crop_pct), mean, std, "bilinear")
