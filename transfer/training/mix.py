"""MixUp and CutMix of whole training batches (torchvision's v2 batch transforms), on the training device."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from transfer.core.errors import ConfigError


class BatchMix:
    """Mix each training batch with a shuffled copy of itself, with probability ``prob``.

    When both alphas are positive each mixed batch is MixUp or CutMix with equal chance (timm's ``Mixup``
    switch). Targets become class probabilities, which ``F.cross_entropy`` takes as they are (label smoothing
    still applies on top).

    Args:
        num_classes: classes of the head.
        mixup_alpha: Beta(alpha, alpha) of the MixUp weight; 0 disables MixUp.
        cutmix_alpha: Beta(alpha, alpha) of the CutMix area; 0 disables CutMix.
        prob: fraction of batches mixed; the others keep hard labels.
    """

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1:
            raise ConfigError(
                f"mix.mixup_alpha={mixup_alpha}, mix.cutmix_alpha={cutmix_alpha} must be >= 0 and "
                f"mix.prob={prob} in [0, 1] (e.g. mix.mixup_alpha=0.2 mix.cutmix_alpha=1.0)."
            )
        kinds = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + (
            [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
        )
        self.transform = v2.RandomChoice(kinds) if len(kinds) > 1 else (kinds[0] if kinds else None)
        self.num_classes, self.prob = num_classes, prob

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Mixed ``(images, target probabilities)``; unmixed batches get one-hot targets."""
        if self.transform is None or torch.rand(()) >= self.prob:
            return images, torch.nn.functional.one_hot(targets, self.num_classes).to(images.dtype)
        mixed, soft = self.transform(images, targets)
        return mixed, soft.to(images.dtype)
