"""Weight sources beyond torch hub (Hugging Face cache, MoCo v3 layout) and the per-family adaptations."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from transfer.errors import WeightsUnavailableError
from transfer.models import REGISTRY, create_model
from transfer.models.adapt import interpolate_pos_embed, reduce_strides, resize_rel_pos_table


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _put_in_hf_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / "0123abcd" / "model.safetensors")


def test_timm_weights_come_from_the_hugging_face_cache(hf_cache: Path):
    state = timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()
    _put_in_hf_cache(hf_cache, REGISTRY["deit_small"].weights.location, state)
    assert REGISTRY["deit_small"].weights.available_offline()
    model = create_model("deit_small", 10, pretrained=True, adapt="resize")
    assert torch.equal(model.backbone.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
    assert model.head.weight.shape == (10, 384)


def test_hugging_face_miss_offline_names_the_repo_and_the_ways_out(hf_cache: Path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("beit_base", 10, pretrained=True)
    assert "timm/beit_base_patch16_224" in str(err.value) and "model.pretrained=false" in str(err.value)


def test_mocov3_checkpoint_layout_converts_into_the_vit_backbone(tmp_path: Path):
    vit = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
    ckpt = {"epoch": 300, "arch": "vit_base",
            "state_dict": {**{f"module.base_encoder.{k}": v for k, v in vit.items() if not k.startswith("head.")},
                           "module.base_encoder.head.0.weight": torch.randn(4096, 768),  # MoCo's projector
                           "module.momentum_encoder.cls_token": torch.randn(1, 1, 768),
                           "module.predictor.0.weight": torch.randn(4096, 256)}}
    torch.save(ckpt, tmp_path / "vit-b-300ep.pth.tar")
    model = create_model("mocov3_vit_base", 10, weights=str(tmp_path / "vit-b-300ep.pth.tar"), adapt="resize")
    assert torch.equal(model.backbone.cls_token, vit["cls_token"])
    assert torch.equal(model.backbone.blocks[11].mlp.fc2.weight, vit["blocks.11.mlp.fc2.weight"])
    assert model.head.weight.shape == (10, 768)


def test_pos_embed_interpolation_keeps_the_class_token_and_the_grid():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(interpolate_pos_embed(pos, 14), pos)
    small = interpolate_pos_embed(pos, 8)
    assert small.shape == (1, 1 + 64, 8) and torch.equal(small[:, 0], pos[:, 0])
    # A position embedding that varies linearly across the grid keeps its layout: left < right, top < bottom.
    ramp = torch.linspace(0, 1, 14)
    grid = (ramp[None, :, None] + 2 * ramp[:, None, None]).reshape(1, 196, 1)
    out = interpolate_pos_embed(torch.cat([torch.zeros(1, 1, 1), grid], 1), 8)[0, 1:, 0].reshape(8, 8)
    assert (out[:, 1:] > out[:, :-1]).all() and (out[1:] > out[:-1]).all()


def test_native_vit_patch_embedding_reproduces_tokens_of_an_upsampled_image():
    """The 4x4 embedding resampled from the 16x16 one sees a 32 px image as the pretrained model sees it
    upsampled 4x (nearest): same tokens, so the pretrained transformer gets the inputs it knows."""
    torch.manual_seed(0)
    pretrained = tvm.vit_b_16(weights=None)
    old_proj = pretrained.conv_proj
    model = create_model("vit_b_16", 10, pretrained=False, adapt="resize")
    REGISTRY["vit_b_16"].adapters["native"](pretrained)
    img = torch.randn(1, 3, 32, 32)
    big = F.interpolate(img, scale_factor=4, mode="nearest")
    assert torch.allclose(pretrained.conv_proj(img), old_proj(big), atol=1e-4)
    assert pretrained.encoder.pos_embedding.shape == (1, 65, 768)
    assert model is not None


def test_swin_native_windows_divide_every_stage():
    model = create_model("swin_t", 10, pretrained=False, adapt="native")
    sizes = iter((8, 4, 2, 1))
    for stage in model.backbone.features[1::2]:
        size = next(sizes)
        for block in stage:
            w = block.attn.window_size[0]
            assert size % w == 0 and block.attn.relative_position_bias_table.shape[0] == (2 * w - 1) ** 2


def test_rel_pos_table_resize_keeps_a_constant_bias():
    table = torch.full((13 * 13, 3), 0.7)
    assert torch.allclose(resize_rel_pos_table(table, 4), torch.full((49, 3), 0.7), atol=1e-6)


def test_reduce_strides_changes_only_the_first_strided_convs():
    net = tvm.mobilenet_v2(weights=None)
    assert reduce_strides(net, 1) == ["features.0.0"]
    assert net.features[2].conv[1][0].stride == (2, 2)


def test_vgg16_keeps_its_first_ten_convs_frozen():
    model = create_model("vgg16", 10, pretrained=False, freeze_convs=10)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert all(not p.requires_grad for c in convs[:10] for p in c.parameters())
    trainable = {id(p) for p in model.trainable_backbone_parameters()}
    assert not any(id(p) in trainable for c in convs[:10] for p in c.parameters())
    assert all(id(p) in trainable for c in convs[10:] for p in c.parameters())
