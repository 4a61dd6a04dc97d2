"""Train and eval transforms, resolved from the model's metadata rather than hard-coded.

Images are augmented at their own resolution first and resized last: cheaper, and it is the order the classic
32 px CIFAR recipe implies. Per-image PIL transforms are used because on 32 px images they are faster per image
than torchvision's v2 tensor kernels, whose per-call overhead dominates at that size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torchvision import transforms as T

from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess

_INTERPOLATION = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def _normalize(pre: Preprocess) -> list[Any]:
    return [T.ToTensor(), T.Normalize(pre.mean, pre.std)]


def _interp(pre: Preprocess) -> T.InterpolationMode:
    if pre.interpolation not in _INTERPOLATION:
        raise ConfigError(f"Unknown interpolation {pre.interpolation!r}; use one of {sorted(_INTERPOLATION)}.")
    return _INTERPOLATION[pre.interpolation]


AUGMENT_KEYS = ("crop_padding", "resized_crop_scale", "random_crop", "hflip", "color_jitter", "rotation")


def _numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each data.augment key must be (null or a missing key always turns the step off).
_AUGMENT_RULES: dict[str, tuple[Any, str]] = {
    "crop_padding": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number of px >= 0"),
    "resized_crop_scale": (
        lambda v: _numbers(v, 2) and 0 < v[0] <= v[1] <= 1,
        "two area fractions [low, high] with 0 < low <= high <= 1 (e.g. [0.35, 1.0])",
    ),
    "random_crop": (lambda v: isinstance(v, bool), "true or false"),
    "hflip": (lambda v: isinstance(v, bool), "true or false"),
    "color_jitter": (
        lambda v: _numbers(v, 4) and min(v) >= 0 and v[3] <= 0.5,
        "four numbers >= 0: brightness, contrast, saturation, hue (hue <= 0.5), e.g. [0.2, 0.2, 0.2, 0.1]",
    ),
    "rotation": (lambda v: _number(v) and 0 <= v <= 180, "degrees in [0, 180]"),
}


def check_augment(augment: Mapping[str, Any], native_size: int | None = None) -> None:
    """Reject ``data.augment`` keys neither augmentation path knows, and values neither could use.

    Args:
        augment: ``data.augment``.
        native_size: the data's own side (32 for CIFAR-10), ``None`` for photos of any size.

    Raises:
        ConfigError: naming every bad key with what it must be.
    """
    unknown = set(augment) - set(AUGMENT_KEYS)
    if unknown:
        raise ConfigError(f"Unknown data.augment keys {sorted(unknown)}; known keys are {sorted(AUGMENT_KEYS)}.")
    bad = [
        f"data.augment.{key}={augment[key]!r} must be {what}"
        for key, (ok, what) in _AUGMENT_RULES.items()
        if augment.get(key) is not None and not ok(augment[key])
    ]
    if augment.get("random_crop") and native_size is not None:
        bad.append(
            f"data.augment.random_crop=true crops a photo's stored margin, and {native_size} px data is used at "
            f"its own size with no margin: use data.augment.crop_padding (a padded random crop) instead"
        )
    if augment.get("random_crop") and augment.get("resized_crop_scale") is not None:
        bad.append(
            "data.augment.random_crop=true (the photo default) and data.augment.resized_crop_scale are two crops: "
            "for RandomResizedCrop pass data.augment.random_crop=false with it, or resized_crop_scale=null"
        )
    if bad:
        raise ConfigError(f"Invalid augmentation: {'; '.join(bad)}. A null value turns that step off.")


def train_transform(pre: Preprocess, augment: Mapping[str, Any]) -> T.Compose:
    """The training pipeline: crop, flip, colour jitter, rotation, then resize and normalise.

    Args:
        pre: the model's :class:`Preprocess`.
        augment: ``data.augment``; keys ``crop_padding`` (padded random crop at the native size),
            ``resized_crop_scale`` (RandomResizedCrop, for photos) or ``random_crop`` (for photos: an
            ``image_size`` window of the eval view's ``resize_size`` square, torchvision's Resize + RandomCrop),
            ``hflip``, ``color_jitter`` (four numbers), ``rotation`` (degrees). A missing or null key disables that
            step.

    Returns:
        A composed transform taking a PIL image.
    """
    native_size = pre.native_size
    check_augment(augment, native_size)
    steps: list[Any] = []
    if augment.get("resized_crop_scale") is not None:
        scale = tuple(augment["resized_crop_scale"])
        steps.append(T.RandomResizedCrop(pre.image_size, scale=scale, interpolation=_interp(pre)))
    elif native_size is None and augment.get("random_crop"):  # the eval view's square, then a window of it
        steps += [T.Resize(pre.resize_size, interpolation=_interp(pre)), T.CenterCrop(pre.resize_size)]
        steps.append(T.RandomCrop(pre.image_size))
    elif native_size is None:
        steps.append(T.Resize((pre.image_size, pre.image_size), interpolation=_interp(pre)))
    elif augment.get("crop_padding") is not None:
        steps.append(T.RandomCrop(native_size, padding=int(augment["crop_padding"])))
    if augment.get("hflip"):
        steps.append(T.RandomHorizontalFlip())
    jitter: Sequence[float] | None = augment.get("color_jitter")
    if jitter:
        steps.append(T.ColorJitter(*jitter))
    if augment.get("rotation"):
        steps.append(T.RandomRotation(float(augment["rotation"])))
    if native_size is not None and augment.get("resized_crop_scale") is None and pre.image_size != native_size:
        steps.append(T.Resize((pre.image_size, pre.image_size), interpolation=_interp(pre), antialias=True))
    return T.Compose(steps + _normalize(pre))


def eval_transform(pre: Preprocess) -> T.Compose:
    """The validation/test/prediction pipeline: deterministic resize (and centre crop for photos), normalise.

    With a ``native_size`` (CIFAR-style data), images of another size (new photos at prediction time) are
    squashed to ``image_size`` like CIFAR's, so a CIFAR-trained model sees what it was trained on. Photos are
    resized to :attr:`Preprocess.resize_size` (the model's crop fraction) and centre-cropped, as torchvision's
    ``Weights.transforms()`` and timm's eval transform do.

    Args:
        pre: the model's :class:`Preprocess`.

    Returns:
        A composed transform taking a PIL image.
    """
    if pre.native_size is not None:
        steps: list[Any] = [T.Resize((pre.image_size, pre.image_size), interpolation=_interp(pre), antialias=True)]
    else:  # the pretrained weights' own eval: shorter side to image_size / crop_pct, then the centre crop
        steps = [T.Resize(pre.resize_size, interpolation=_interp(pre)), T.CenterCrop(pre.image_size)]
    return T.Compose(steps + _normalize(pre))
