"""Batched augmentation on the training device, with random parameters drawn per sample.

The per-image PIL pipeline (:func:`~transfer.data.transforms.train_transform`) costs ~0.4 ms per 32 px image on
a CPU core, which a GPU step outruns by far. Here a whole uint8 batch is augmented in two tensor passes:

* geometry: padded random crop (or random resized crop, or a window of a photo's stored square), horizontal
  flip, rotation *and* the resize to the model's input size are composed into one affine matrix per sample and
  applied with a single ``grid_sample``. Crop and flip move whole pixels, so composing them with the rotation
  before sampling gives the same image as applying them one after another (nearest sampling at the native size);
  a resize is folded into the same warp with bilinear sampling, one interpolation instead of two.
* colour: brightness, saturation and hue are one 3x3 matrix per sample (hue is a rotation about the grey
  axis in YIQ space, as NVIDIA DALI's ``ColorTwist`` does, instead of a shift in HSV), contrast blends with
  each image's mean grey, and the normalisation is folded in at the end.

Parameters are drawn with the same distributions as torchvision's transforms (crop offset uniform in
``[-padding, padding]``, flip with p=0.5, angle uniform in ``[-deg, deg]``, jitter factors uniform in
``[1-b, 1+b]`` and hue in ``[-h, h]``). Two differences, both measured to leave the per-channel statistics
unchanged (``tests/data/test_batch_augment.py``): the colour adjustments run in a fixed order rather than a
random one, and hue is rotated in YIQ rather than shifted in HSV. kornia's ``AugmentationSequential`` with
the same four transforms was the alternative; its HSV round trip alone costs more per batch than this whole
module, which folds everything into one warp and a few fused colour operations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess
from transfer.data.transforms import check_augment

# RGB -> YIQ (NTSC). Hue rotates the (I, Q) plane; saturation scales it; Y (luma) is kept.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_GREY = (0.299, 0.587, 0.114)  # the luma weights torchvision's rgb_to_grayscale uses for contrast


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


class BatchAugment(nn.Module):
    """uint8 ``(B, 3, H, W)`` batch in, normalised float batch at the model's input size out.

    Args:
        pre: the model's :class:`~transfer.data.transforms.Preprocess` (size, mean, std, interpolation).
        augment: the ``data.augment`` mapping (same keys as the PIL path); ``{}`` for evaluation.
        generator: optional ``torch.Generator`` on the batch's device; ``None`` uses the global RNG (seeded by
            ``seed_everything``), so runs with the same seed see the same augmented batches.
    """

    # registered in __init__; declared here so the arithmetic below type-checks as tensors
    mean: Tensor
    std: Tensor
    grey: Tensor
    rgb2yiq: Tensor
    yiq2rgb: Tensor

    def __init__(
        self, pre: Preprocess, augment: Mapping[str, Any] | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.pre = pre
        self.augment = dict(augment or {})
        check_augment(self.augment, pre.native_size)
        self.generator = generator
        # The training output size, None for pre.image_size: progressive resizing lowers it for early epochs through
        # the data module's set_train_size. Evaluation always keeps pre.image_size.
        self.train_size: int | None = None
        # constants live on the batch's device with the module: no host-to-device copies per batch
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("grey", torch.tensor(_GREY).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb2yiq", _RGB2YIQ.clone(), persistent=False)
        self.register_buffer("yiq2rgb", _YIQ2RGB.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor, train: bool = True) -> Tensor:
        """Augment (when ``train``) and normalise a batch.

        Args:
            images: uint8 ``(B, 3, H, W)``; any memory format.
            train: draw random parameters; ``False`` gives the deterministic eval view (resize or centre crop).

        Returns:
            float32 ``(B, 3, S, S)`` in channels-last memory format, ``S = pre.image_size``.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(
                f"BatchAugment takes uint8 (B, 3, H, W) batches, got {images.dtype} {tuple(images.shape)}."
            )
        # NCHW float in 0..255: the warp is linear, so the /255 waits to be folded into a later multiply
        x = images.contiguous().float()
        aug = self.augment if train else {}
        x, window = self._geometry(x, aug)
        if aug.get("color_jitter"):
            x = self._colour(x, *aug["color_jitter"])  # returns [0, 1]
        else:
            x = x.mul_(1 / 255)
        if window is not None:  # torchvision rotates after the jitter: the corners it exposes stay black
            x = x.mul_(window)
        # (x - mean) / std as one fused multiply-add
        x = torch.addcmul(-self.mean / self.std, x, 1 / self.std)
        return x.contiguous(memory_format=torch.channels_last)

    def _geometry(self, x: Tensor, aug: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Crop, flip, rotate and resize in one warp; also the mask of output pixels inside the crop window."""
        b, _, h, w = x.shape
        size = self.train_size or self.pre.image_size
        if not aug:
            return self._eval_view(x), None
        theta = self._theta(b, h, w, aug, x.device)
        # Nearest keeps whole-pixel crops and flips exact when nothing is resized; resizing needs interpolation.
        exact = (h, w) == (size, size) or (aug.get("random_crop") and size == self.pre.image_size)
        mode = "nearest" if exact else self._mode()
        # The grid by broadcasting (cheaper than affine_grid's batched matmul for 3x3 maps): output pixel centres
        # p in [-1, 1], rotated (u, v) in the crop window's own units, then scaled and shifted into the source.
        p = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1
        px, py = p.view(1, 1, size), p.view(1, size, 1)
        cos, sin, sx, sy, cx, cy = (t.view(b, 1, 1) for t in theta)
        u, v = cos * px - sin * py, sin * px + cos * py
        grid = torch.stack([u * sx + cx, v * sy + cy], dim=-1)
        out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
        if not aug.get("rotation"):
            return out, None
        # torchvision rotates the *cropped* image, so points rotated in from outside the crop window are black
        # even where the source image goes on.
        window = (u.abs() < 1) & (v.abs() < 1)
        return out, window.unsqueeze(1).to(out.dtype)

    def _eval_view(self, x: Tensor) -> Tensor:
        """What :func:`~transfer.data.transforms.eval_transform` does: a resize, or for photos a centre crop."""
        size, (h, w) = self.pre.image_size, x.shape[-2:]
        if self.pre.native_size is None and h >= size and w >= size:
            top, left = round((h - size) / 2), round((w - size) / 2)
            return x[..., top : top + size, left : left + size]
        return F.interpolate(x, size=(size, size), mode=self._mode(), antialias=True, align_corners=False)

    def _mode(self) -> str:
        return "bicubic" if self.pre.interpolation == "bicubic" else "bilinear"

    def _theta(self, b: int, h: int, w: int, aug: Mapping[str, Any], device: torch.device) -> tuple[Tensor, ...]:
        """Per-sample ``(cos, sin, sx, sy, cx, cy)``: rotation, then the crop window's half-size (negative
        ``sx`` flips) and centre in the source, in ``grid_sample``'s [-1, 1] units."""
        gen = self.generator
        cx, cy = torch.zeros(b, device=device), torch.zeros(b, device=device)
        sx, sy = torch.ones(b, device=device), torch.ones(b, device=device)
        if aug.get("resized_crop_scale") is not None:
            cx, cy, sx, sy = self._resized_crop_box(b, aug["resized_crop_scale"], gen, device)
        elif aug.get("random_crop"):
            cx, cy, sx, sy = self._random_crop_box(b, h, w, self.pre.image_size, gen, device)
        elif aug.get("crop_padding"):
            pad = int(aug["crop_padding"])  # integer offsets in [-pad, pad] pixels, as RandomCrop(padding=pad)
            cx = torch.randint(-pad, pad + 1, (b,), generator=gen, device=device).float() * 2 / w
            cy = torch.randint(-pad, pad + 1, (b,), generator=gen, device=device).float() * 2 / h
        if aug.get("hflip"):
            sx = torch.where(torch.rand(b, generator=gen, device=device) < 0.5, -sx, sx)
        angle = _uniform(b, -1.0, 1.0, gen, device) * math.radians(float(aug.get("rotation") or 0))
        return torch.cos(angle), torch.sin(angle), sx, sy, cx, cy

    @staticmethod
    def _random_crop_box(
        b: int, h: int, w: int, crop: int, gen: torch.Generator | None, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """RandomCrop's box: a ``crop``-px window at a whole-pixel offset, so every sample lands on a source pixel's
        centre (the output pixel i of a window at offset o is the source pixel o + i). Photos are stored at the
        eval view's ``resize_size`` square, larger than ``crop``; small images are refused by
        :func:`~transfer.data.transforms.check_augment`."""
        oy = torch.randint(0, h - crop + 1, (b,), generator=gen, device=device).float()
        ox = torch.randint(0, w - crop + 1, (b,), generator=gen, device=device).float()
        cx, cy = (2 * ox - (w - crop)) / w, (2 * oy - (h - crop)) / h
        return cx, cy, torch.full_like(ox, crop / w), torch.full_like(oy, crop / h)

    @staticmethod
    def _resized_crop_box(
        b: int, scale: Any, gen: torch.Generator | None, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """RandomResizedCrop's box: area fraction in ``scale``, log-uniform aspect ratio in [3/4, 4/3]."""
        area = _uniform(b, float(scale[0]), float(scale[1]), gen, device)
        ratio = torch.exp(_uniform(b, math.log(3 / 4), math.log(4 / 3), gen, device))
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=gen, device=device) * 2 - 1) * (1 - sx)
        cy = (torch.rand(b, generator=gen, device=device) * 2 - 1) * (1 - sy)
        return cx, cy, sx, sy

    def _colour(self, x: Tensor, brightness: float, contrast: float, saturation: float, hue: float) -> Tensor:
        b, gen, dev = x.shape[0], self.generator, x.device
        bright = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, gen, dev)
        contr = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, gen, dev)
        sat = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, gen, dev)
        angle = _uniform(b, -hue, hue, gen, dev) * 2 * math.pi  # hue is a fraction of the colour wheel
        # brightness (with the pending /255) and contrast first; torchvision clamps after each step, so do we.
        # The mean grey is the luma-weighted sum of the channel means: one reduction, no grey image.
        x = x.mul_((bright / 255).view(b, 1, 1, 1)).clamp_(0, 1)
        grey = (x.mean((2, 3)) * self.grey.view(1, 3)).sum(1).view(b, 1, 1, 1)
        c = contr.view(b, 1, 1, 1)
        x = x.mul_(c).add_((1 - c) * grey).clamp_(0, 1)
        # saturation and hue: one matrix per sample, applied in YIQ (luma kept, chroma scaled and rotated)
        cos, sin = torch.cos(angle) * sat, torch.sin(angle) * sat
        one, zero = torch.ones_like(cos), torch.zeros_like(cos)
        twist = torch.stack(
            [torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1), torch.stack([zero, sin, cos], 1)], 1
        )
        matrix = self.yiq2rgb @ twist @ self.rgb2yiq  # (B, 3, 3)
        out = torch.bmm(matrix, x.contiguous().view(b, 3, -1)).view_as(x)
        return out.clamp_(0, 1)
