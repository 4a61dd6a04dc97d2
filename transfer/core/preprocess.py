"""What a model expects of its input: the one description the model factory writes and the data module reads.

It lives below both layers, so the models never import the data package and the data package never imports
the models: :func:`transfer.models.model_preprocess` makes one, the data module and every deployment path take it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input.

    Attributes:
        image_size: side length fed to the model.
        mean: normalisation mean (of the pretrained weights).
        std: normalisation std.
        interpolation: resize interpolation (of the pretrained weights).
        crop_pct: for photos of any size, eval resizes to ``image_size / crop_pct`` then centre-crops: the
            pretrained weights' own crop fraction (``transfer.models.model_preprocess``). The default is what a
            checkpoint that does not store one was trained and evaluated with.
        native_size: the training data's own size (32 for CIFAR-10), ``None`` for photos of any size; decides
            how new images are brought to ``image_size`` at prediction time.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    native_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, for checkpoints."""
        return asdict(self)

    @property
    def resize_size(self) -> int:
        """The side (shorter edge) eval resizes photos to before the ``image_size`` centre crop."""
        return round(self.image_size / self.crop_pct)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict` (lists from JSON or YAML become tuples again).

        A dict from an older checkpoint may lack keys added since (they take their defaults); keys this version
        does not know are ignored, so a newer checkpoint's dict still loads.
        """
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        return cls(**{**kept, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the normalisation of a ``(..., 3, H, W)`` batch, back to [0, 1] pixels for display."""
        mean = torch.tensor(self.mean, device=x.device)[:, None, None]
        std = torch.tensor(self.std, device=x.device)[:, None, None]
        return (x * std + mean).clamp(0, 1)
