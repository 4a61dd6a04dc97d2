from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess
from transfer.data.batch_augment import BatchAugment
from transfer.data.transforms import train_transform

SOURCE_AUG = {"crop_padding": 4, "hflip": True, "color_jitter": (0.2, 0.2, 0.2, 0.1), "rotation": 15}
PIXELS = Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), native_size=32)  # identity normalisation: [0, 1] out


def photos(n: int, seed: int = 0) -> torch.Tensor:
    """Image-like uint8 batch: smooth colour gradients with blobs and noise (pure noise hides geometry)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    base = torch.rand(n, 3, 1, 1, generator=g) * xx + torch.rand(n, 3, 1, 1, generator=g) * yy
    blob = ((xx - torch.rand(n, 1, 1, 1, generator=g)) ** 2 + (yy - 0.5) ** 2 < 0.05).float()
    img = base / 2 + blob * torch.rand(n, 3, 1, 1, generator=g) * 0.5 + torch.rand(n, 3, 32, 32, generator=g) * 0.1
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def test_parameters_differ_per_sample_within_a_batch():
    same = photos(1).repeat(16, 1, 1, 1)
    out = BatchAugment(PIXELS, SOURCE_AUG)(same)
    flat = out.flatten(1)
    distinct = {tuple(row.round(decimals=4).tolist()) for row in flat}
    assert len(distinct) == 16


def test_output_is_normalised_float_in_range_and_channels_last():
    x = photos(64)
    out = BatchAugment(PIXELS, SOURCE_AUG)(x)
    assert out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
    assert out.is_contiguous(memory_format=torch.channels_last)
    pre = Preprocess(40, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), native_size=32)
    out = BatchAugment(pre, SOURCE_AUG)(x)
    assert out.shape == (64, 3, 40, 40)
    lo = (0 - torch.tensor(pre.mean)) / 0.2
    hi = (1 - torch.tensor(pre.mean)) / 0.2
    assert (out.amin((0, 2, 3)) >= lo - 1e-5).all() and (out.amax((0, 2, 3)) <= hi + 1e-5).all()


def test_fixed_seed_reproduces_a_batch():
    x = photos(8)
    aug = BatchAugment(PIXELS, SOURCE_AUG)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    c = aug(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    gen_a = BatchAugment(PIXELS, SOURCE_AUG, generator=torch.Generator().manual_seed(1))(x)
    gen_b = BatchAugment(PIXELS, SOURCE_AUG, generator=torch.Generator().manual_seed(1))(x)
    assert torch.equal(gen_a, gen_b)


def test_crop_and_flip_move_whole_pixels_like_randomcrop():
    """Without rotation or resize, every output is an exact integer shift (maybe mirrored) of its input."""
    x = photos(12)
    out = BatchAugment(PIXELS, {"crop_padding": 4, "hflip": True})(x)
    padded = F.pad(x.float() / 255, (4, 4, 4, 4))
    for i in range(len(x)):
        candidates = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        # whole pixels moved (float rounding of the /255 aside), not interpolated ones
        assert any(torch.allclose(out[i], c, atol=1e-6) for c in candidates), f"sample {i} is not a padded crop"


def test_eval_view_is_deterministic_and_only_resizes_and_normalises():
    x = photos(4)
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), native_size=32)
    aug = BatchAugment(pre, SOURCE_AUG)
    assert torch.allclose(aug(x, train=False), (x.float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_distribution_matches_the_pil_path_on_summary_statistics():
    x = photos(512, seed=1)
    torch.manual_seed(0)
    ours = BatchAugment(PIXELS, SOURCE_AUG)(x)
    tf = train_transform(PIXELS, SOURCE_AUG)
    theirs = torch.stack([tf(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])
    for stat in (
        lambda t: t.mean((0, 2, 3)),
        lambda t: t.std((0, 2, 3)),
        lambda t: (t.sum(1) == 0).float().mean(),
    ):  # black pixels: padding and rotated-in corners
        assert torch.allclose(stat(ours), stat(theirs), atol=0.015), (stat(ours), stat(theirs))
    # per-image brightness spread (the jitter's strength), not just the pooled moments
    assert abs(ours.mean((1, 2, 3)).std() - theirs.mean((1, 2, 3)).std()) < 0.01


def test_random_resized_crop_for_photos_keeps_output_size():
    pre = Preprocess(24, (0.0,) * 3, (1.0,) * 3, native_size=None)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (5, 27, 27, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    aug = BatchAugment(pre, {"resized_crop_scale": (0.35, 1.0), "hflip": True, "rotation": 10})
    assert aug(x).shape == (5, 3, 24, 24)
    centre = aug(x, train=False)
    assert torch.allclose(centre, x[..., 2:26, 2:26].float() / 255, atol=1e-6)  # eval: the centre 24 of 27 px


def test_random_crop_for_photos_takes_whole_pixel_windows_of_the_stored_square():
    """Every output is an exact window of the stored square (maybe mirrored), at offsets spread over the margin."""
    pre = Preprocess(24, (0.0,) * 3, (1.0,) * 3, crop_pct=0.875, native_size=None)  # stored at 27 px
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (64, 27, 27, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    out = BatchAugment(pre, {"random_crop": True, "hflip": True}, generator=torch.Generator().manual_seed(0))(x)
    assert out.shape == (64, 3, 24, 24)
    src, offsets = x.float() / 255, set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(4)
            for dx in range(4)
            for window in (src[i, :, dy : dy + 24, dx : dx + 24],)
            if torch.allclose(out[i], window, atol=1e-6) or torch.allclose(out[i], window.flip(-1), atol=1e-6)
        ]
        assert hits, f"sample {i} is not a window of its stored square"
        offsets.update(hits)
    assert len(offsets) > 8  # of the 16 possible: the offsets are drawn, not fixed


def test_random_crop_is_refused_on_small_images_and_beside_a_resized_crop():
    with pytest.raises(ConfigError, match="crop_padding"):
        BatchAugment(PIXELS, {"random_crop": True})
    photo = Preprocess(24, (0.0,) * 3, (1.0,) * 3, native_size=None)
    with pytest.raises(ConfigError, match="random_crop=false"):
        BatchAugment(photo, {"random_crop": True, "resized_crop_scale": (0.35, 1.0)})
    with pytest.raises(ConfigError, match="crop_padding"):
        train_transform(PIXELS, {"random_crop": True})


def test_the_pil_path_crops_windows_of_the_eval_square_like_the_batched_path():
    import torchvision.transforms.v2 as T

    pre = Preprocess(24, (0.0,) * 3, (1.0,) * 3, crop_pct=0.875, native_size=None)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    square = T.Compose([T.PILToTensor(), T.Resize(27), T.CenterCrop(27), T.ToDtype(torch.float32, scale=True)])(img)
    tf = train_transform(pre, {"random_crop": True})
    torch.manual_seed(0)
    for _ in range(8):
        out = tf(img)
        windows = [square[:, dy : dy + 24, dx : dx + 24] for dy in range(4) for dx in range(4)]
        assert any(torch.allclose(out, w, atol=1.5 / 255) for w in windows)  # PIL and tensor resizes round apart


def test_rejects_float_input_and_bad_jitter():
    with pytest.raises(ConfigError, match="uint8"):
        BatchAugment(PIXELS, {})(torch.rand(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="four numbers"):
        BatchAugment(PIXELS, {"color_jitter": [0.2, 0.2]})
