"""The optimizer's param groups: built once from the model, every trainable tensor in exactly one of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfer.training.optim import build_optimizer
from transfer.training.param_groups import GroupPlan, build_param_groups, describe, layer_groups


class Encoder(nn.Module):
    """A ViT-like backbone: class token and position embedding (3-d), a stem conv, numbered blocks, a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 5, 4))
        self.stem = nn.Conv2d(3, 4, 2)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3)))
        self.norm = nn.LayerNorm(4)


class Model(nn.Module):
    """What the groups read of a TransferModel: backbone, neck, head, and the backbone's trainable tensors."""

    def __init__(self, fixed: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = Encoder(), nn.BatchNorm1d(4), nn.Linear(4, 3)
        self.fixed = fixed
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(name not in fixed)

    def trainable_backbone_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.backbone.named_parameters() if n not in self.fixed]


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_every_trainable_tensor_is_in_exactly_one_group_and_fixed_ones_in_none(layer_decay: float):
    model = Model(fixed=("stem.weight", "stem.bias"))
    groups = build_param_groups(model, GroupPlan(1, 0.1, layer_decay), lr=1e-3)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    fixed = {id(model.backbone.stem.weight), id(model.backbone.stem.bias)}
    assert set(grouped) == {id(p) for p in model.parameters()} - fixed
    assert len({g["name"] for g in groups}) == len(groups)


def test_no_decay_groups_hold_exactly_the_1d_tensors_and_the_embeddings():
    model = Model()
    groups = build_param_groups(model, GroupPlan(0, 0.1, 0.5), lr=1e-3)
    exempt = {id(p) for g in groups if g["name"].endswith(".no_decay") for p in g["params"]}
    embeddings = {id(model.backbone.class_token), id(model.backbone.pos_embedding)}
    assert exempt == {id(p) for p in model.parameters() if p.ndim <= 1} | embeddings
    optimizer = build_optimizer({"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.05}, groups)
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert all(decay == (0.0 if name.endswith(".no_decay") else 0.05) for name, decay in decays.items())


def test_layer_decay_scales_each_layer_from_the_top_down():
    groups = by_name(build_param_groups(Model(), GroupPlan(0, 0.5, 0.5), lr=1.0))
    # layers: the stem and the embeddings before it, blocks.0, blocks.1, blocks.2 with the final norm
    assert [name for name in groups if not name.endswith(".no_decay")] == [
        "head",
        "backbone.0",
        "backbone.1",
        "backbone.2",
        "backbone.3",
    ]
    assert [groups[f"backbone.{d}"]["lr"] for d in range(4)] == pytest.approx([0.0625, 0.125, 0.25, 0.5])
    assert groups["backbone.3.no_decay"]["lr"] == groups["backbone.3"]["lr"]
    assert groups["head"]["lr"] == groups["head.no_decay"]["lr"] == 1.0
    assert {g["trains_from"] for name, g in groups.items() if name.startswith("backbone")} == {0}


def test_a_model_can_supply_its_own_layer_split():
    model = Model()
    named = list(model.backbone.named_parameters())
    model.layer_split = lambda: [named[:4], named[4:]]  # type: ignore[attr-defined]
    groups = by_name(build_param_groups(model, GroupPlan(0, 1.0, 0.5), lr=1.0))
    assert {n.removesuffix(".no_decay") for n in groups} == {"head", "backbone.0", "backbone.1"}
    assert groups["backbone.0"]["lr"] == 0.5 and groups["backbone.1"]["lr"] == 1.0
    model.layer_split = lambda: [named[:4], named[3:]]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="exactly once"):
        build_param_groups(model, GroupPlan(0, 1.0, 0.5), lr=1.0)


def test_a_linear_probe_optimizes_the_head_only():
    model = Model()
    groups = build_param_groups(model, GroupPlan(None), lr=1e-3)
    assert [g["name"] for g in groups] == ["head", "head.no_decay"]
    assert {id(p) for g in groups for p in g["params"]} == {
        id(p) for p in [*model.neck.parameters(), *model.head.parameters()]
    }


def test_layer_groups_split_numbered_blocks_with_the_stem_first():
    names = [
        "conv_stem.weight",
        "bn1.weight",
        "blocks.0.0.conv.weight",
        "blocks.0.1.conv.weight",
        "blocks.1.0.conv.weight",
        "conv_head.weight",
        "bn2.weight",
    ]
    groups = layer_groups([(n, nn.Parameter(torch.zeros(1))) for n in names])
    assert [[n for n, _ in g] for g in groups] == [names[:2], names[2:4], names[4:]]
    resnet = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight", "layer2.0.conv1.weight"]
    assert [len(g) for g in layer_groups([(n, nn.Parameter(torch.zeros(1))) for n in resnet])] == [2, 1, 1, 1]


def test_the_plan_line_names_one_backbone_rate_once_and_a_layered_range_as_a_range():
    single = describe(build_param_groups(Model(), GroupPlan(2, 0.1), lr=1e-3), lr=1e-3)
    assert "4 param groups (2 without weight decay)" in single
    assert "head lr 0.001" in single and "backbone lr 0.0001, frozen for 2 epoch(s), trained from epoch 3" in single
    assert "deepest" not in single
    layered = describe(build_param_groups(Model(), GroupPlan(0, 0.5, 0.5), lr=1.0), lr=1.0)
    assert "backbone 4 layers, lr 0.0625 (deepest) .. 0.5 (top), trains from the start" in layered
    probe = describe(build_param_groups(Model(), GroupPlan(None), lr=1.0), lr=1.0)
    assert "backbone frozen throughout" in probe


@pytest.mark.parametrize("name", ["vit_b_16", "densenet121", "inception_v3", "swin_t", "resnet18"])
def test_layer_decay_splits_every_family_into_its_blocks(name: str):
    """The families whose block names carry no number (ViT encoder_layer_N, denseblockN, Mixed_5b, Swin stages)
    get one lr per block through the model's own split, deepest block at the top lr."""
    from transfer.models import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=3, pretrained=False, adapt="resize")
    groups = [g for g in build_param_groups(model, GroupPlan(0, 0.5, 0.8), lr=1.0) if g["name"].startswith("backbone")]
    decayed = [g for g in groups if not g["name"].endswith("no_decay")]
    assert len(decayed) == len(model.layer_split()) > 2
    lrs = [g["lr"] for g in decayed]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(0.5) and lrs[0] == pytest.approx(0.5 * 0.8 ** (len(lrs) - 1))
