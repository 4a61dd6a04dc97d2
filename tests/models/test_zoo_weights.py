"""Weight sources beyond torch hub (Hugging Face cache, MoCo v3 layout) and the per-family adaptations."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torchvision import models as tvm

from transfer.core.errors import WeightsUnavailableError
from transfer.models import REGISTRY, create_model
from transfer.models.adapt import reduce_strides


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
    _put_in_hf_cache(hf_cache, REGISTRY["deit_small"].pretrained_cfg.source.location, state)
    assert REGISTRY["deit_small"].pretrained_cfg.source.available_offline()
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
    ckpt = {
        "epoch": 300,
        "arch": "vit_base",
        "state_dict": {
            **{f"module.base_encoder.{k}": v for k, v in vit.items() if not k.startswith("head.")},
            "module.base_encoder.head.0.weight": torch.randn(4096, 768),  # MoCo's projector
            "module.momentum_encoder.cls_token": torch.randn(1, 1, 768),
            "module.predictor.0.weight": torch.randn(4096, 256),
        },
    }
    torch.save(ckpt, tmp_path / "vit-b-300ep.pth.tar")
    model = create_model("mocov3_vit_base", 10, weights=str(tmp_path / "vit-b-300ep.pth.tar"), adapt="resize")
    assert torch.equal(model.backbone.cls_token, vit["cls_token"])
    assert torch.equal(model.backbone.blocks[11].mlp.fc2.weight, vit["blocks.11.mlp.fc2.weight"])
    assert model.head.weight.shape == (10, 768)


def _bicubic(grid: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """The resampling the adapters did by hand before timm's: ``(1, C, g, g)`` to ``size`` x ``size``, bicubic."""
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)


def test_native_vit_pos_embed_keeps_the_class_token_and_resamples_the_grid_as_before():
    net = tvm.VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    # A ramp across the grid (left < right, top < bottom) shows the layout survives: no transposed or shuffled grid.
    ramp = torch.linspace(0, 1, 14)
    grid = (ramp[None, :] + 2 * ramp[:, None]).expand(1, 8, 14, 14) + torch.randn(1, 8, 1, 1)
    cls = torch.randn(1, 1, 8)
    with torch.no_grad():
        net.encoder.pos_embedding.copy_(torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1))
    assert resample_abs_pos_embed(net.encoder.pos_embedding, [14, 14]) is net.encoder.pos_embedding  # same size
    REGISTRY["vit_b_16"].adapters["native"](net)
    pos = net.encoder.pos_embedding
    assert pos.shape == (1, 1 + 64, 8) and torch.equal(pos[:, :1], cls)
    out = pos[0, 1:].T.reshape(8, 8, 8)
    assert torch.allclose(out, _bicubic(grid, 8, antialias=True)[0], atol=1e-6)  # the hand-written version's numbers
    assert (out[:, :, 1:] > out[:, :, :-1]).all() and (out[:, 1:] > out[:, :-1]).all()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


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
    # adapt=resize leaves the architecture as pretrained: 16 px patches, 14 x 14 + 1 positions
    vit = model.backbone
    assert vit.conv_proj.kernel_size == (16, 16) and vit.encoder.pos_embedding.shape == (1, 197, 768)


def test_swin_native_windows_divide_every_stage():
    model = create_model("swin_t", 10, pretrained=False, adapt="native")
    sizes = iter((8, 4, 2, 1))
    for stage in model.backbone.features[1::2]:
        size = next(sizes)
        for block in stage:
            w = block.attn.window_size[0]
            assert size % w == 0 and block.attn.relative_position_bias_table.shape[0] == (2 * w - 1) ** 2


def test_swin_native_bias_tables_are_resized_bicubically_as_before():
    torch.manual_seed(0)
    net = tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], window_size=[7, 7]
    )
    blocks = [block for stage in net.features[1::2] for block in stage]
    before = [block.attn.relative_position_bias_table.detach().clone() for block in blocks]
    REGISTRY["swin_t"].adapters["native"](net)
    for block, table in zip(blocks, before, strict=True):
        w = block.attn.window_size[0]
        new = block.attn.relative_position_bias_table
        # torchvision's table is ((2w-1)^2, heads), row-major over the (dy, dx) offset grid, as timm's is.
        expected = _bicubic(table.T.reshape(1, 2, 13, 13), 2 * w - 1, antialias=False).reshape(2, -1).T
        assert new.shape == ((2 * w - 1) ** 2, 2) and torch.allclose(new, expected, atol=1e-6)
        assert int(block.attn.relative_position_index.max()) == new.shape[0] - 1  # the index was rebuilt to match
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_reduce_strides_changes_only_the_first_strided_convs():
    net = tvm.mobilenet_v2(weights=None)
    assert reduce_strides(net, 1) == ["features.0.0"]
    assert net.features[2].conv[1][0].stride == (2, 2)


def test_vgg16_keeps_its_first_ten_convs_frozen():
    model = create_model("vgg16", 10, pretrained=False, frozen_layers=10)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert all(not p.requires_grad for c in convs[:10] for p in c.parameters())
    trainable = {id(p) for p in model.trainable_backbone_parameters()}
    assert not any(id(p) in trainable for c in convs[:10] for p in c.parameters())
    assert all(id(p) in trainable for c in convs[10:] for p in c.parameters())
