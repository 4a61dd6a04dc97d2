"""What a checkpoint (or an export's JSON) says about itself, checked before anything is built from it.

A checkpoint is input like any other file: one that loads safely (``weights_only``) can still declare a
60000 px input, a billion classes or a normalisation that divides by zero, and building from that allocates
until the machine gives out. Every value that sizes memory or picks code is bounded here, and each failure is
one :class:`~transfer.core.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess

# Generous for any real model (ViTs run at 518 px, detection backbones at 1333), far below what exhausts memory.
SIZE_RANGE = (8, 4096)
CLASS_RANGE = (2, 100_000)
MAX_NAME_LENGTH = 256
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # what transfer.data.transforms can resize with
# The Classifier's constructor arguments: anything else in hyper_parameters was not written by transfer.run.
HPARAM_KEYS = ("model", "class_names", "optimizer", "scheduler", "label_smoothing", "mix", "tta", "preprocess")


def refuse(where: str | Path, field: str, problem: str) -> ConfigError:
    """The one-paragraph error for a bad field of a checkpoint or export description."""
    return ConfigError(
        f"{where}: {field} {problem}. The file was not written by this project's transfer.run or transfer.export, "
        f"or it was altered; nothing was built from it. Pass a checkpoint from a run's checkpoints/ folder, or "
        f"export it again with python -m transfer.export."
    )


def trained_on_val(ckpt: Mapping[str, Any]) -> bool:
    """Whether the checkpoint's run trained on its validation images (``data.train_on_val``, as its data module
    recorded it); a checkpoint without that record did not."""
    data = ckpt.get("datamodule_hyper_parameters")
    return isinstance(data, Mapping) and data.get("train_on_val") is True


def _int_in(value: Any, bounds: tuple[int, int]) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]


def check_class_names(names: Any, where: str | Path, field: str = "class_names") -> list[str]:
    """``names`` if it is a list of 2..100000 unique, non-empty strings of at most 256 characters.

    Args:
        names: the value read from the file.
        where: the file, for the message.
        field: the field's name in the file, for the message.

    Returns:
        The names as a list.
    """
    if not isinstance(names, (list, tuple)):
        raise refuse(where, field, f"is a {type(names).__name__}, not a list of class names")
    if not CLASS_RANGE[0] <= len(names) <= CLASS_RANGE[1]:
        raise refuse(where, field, f"holds {len(names)} names; a classifier has {CLASS_RANGE[0]}..{CLASS_RANGE[1]}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
            shown = repr(name)[:60]
            raise refuse(where, f"{field}[{i}]", f"= {shown} is not a string of 1..{MAX_NAME_LENGTH} characters")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise refuse(where, field, f"names {name[:60]!r} more than once; class names must be unique")
        seen.add(name)
    return list(names)


def _check_floats(values: Any, where: str | Path, field: str, positive: bool) -> tuple[float, ...]:
    ok = isinstance(values, (list, tuple)) and len(values) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or (positive and min(values) <= 0):
        what = "3 finite numbers > 0" if positive else "3 finite numbers"
        raise refuse(where, field, f"= {str(values)[:80]} must be {what} (one per RGB channel)")
    return tuple(float(v) for v in values)


def check_preprocess(pre: Any, where: str | Path, field: str = "preprocess") -> Preprocess:
    """A :class:`Preprocess` from a file's record, every value bounded (see the module docstring).

    Args:
        pre: the record (``Preprocess.to_dict()`` as written into a checkpoint or an export's JSON).
        where: the file, for the message.
        field: the record's name in the file, for the message.

    Returns:
        The preprocessing.
    """
    if not isinstance(pre, Mapping):
        raise refuse(where, field, f"is a {type(pre).__name__}, not a preprocessing record")
    low, high = SIZE_RANGE
    size = pre.get("image_size")
    if not _int_in(size, SIZE_RANGE):
        raise refuse(where, f"{field}.image_size", f"= {str(size)[:40]} is not an input size of {low}..{high} px")
    native = pre.get("native_size")
    if native is not None and not _int_in(native, (1, high)):
        raise refuse(where, f"{field}.native_size", f"= {str(native)[:40]} is neither null nor 1..{high} px")
    _check_floats(pre.get("mean"), where, f"{field}.mean", positive=False)
    _check_floats(pre.get("std"), where, f"{field}.std", positive=True)
    interpolation = pre.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise refuse(where, f"{field}.interpolation", f"= {str(interpolation)[:40]!r} is not one of {INTERPOLATIONS}")
    crop = pre.get("crop_pct", 0.875)
    if not (isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1):
        raise refuse(where, f"{field}.crop_pct", f"= {str(crop)[:40]} is not a fraction in (0, 1]")
    return Preprocess.from_dict(pre)


def check_hparams(hparams: Any, where: str | Path, models: Collection[str]) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters``, checked before the classifier is built from them.

    Keys other than the classifier's arguments are refused, Lightning's ``_instantiator``/``_class_path`` above
    all: ``load_from_checkpoint`` would import and call what they name.

    Args:
        hparams: the checkpoint's ``hyper_parameters`` entry.
        where: the file, for the message.
        models: the registered model names.

    Returns:
        The hyper-parameters, with ``class_names`` and ``preprocess`` checked.
    """
    if not isinstance(hparams, Mapping):
        raise refuse(where, "hyper_parameters", "is missing")
    unknown = sorted(str(k) for k in hparams if k not in HPARAM_KEYS)
    if unknown:
        raise refuse(where, "hyper_parameters", f"holds {', '.join(unknown)[:120]}, which a classifier does not take")
    model = hparams.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
        raise refuse(where, "hyper_parameters.model.name", "is missing")
    if model["name"] not in models:
        raise refuse(where, "hyper_parameters.model.name", f"= {model['name'][:60]!r} is no registered model")
    checked = dict(hparams)
    checked["class_names"] = check_class_names(hparams.get("class_names"), where, "hyper_parameters.class_names")
    if hparams.get("preprocess") is not None:
        check_preprocess(hparams["preprocess"], where, "hyper_parameters.preprocess")
    return checked
