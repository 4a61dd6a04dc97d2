from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer.core.errors import ConfigError
from transfer.data import CIFAR10Data
from transfer.models import model_preprocess
from transfer.training.finetune import StagedFinetuning, batchnorms, layer_groups
from transfer.training.module import Classifier

# The tiny test architectures are registered for each test of this module only (conftest.tiny_models).
pytestmark = pytest.mark.usefixtures("tiny_models")
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}
COSINE = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 4, "interval": "epoch"}
PLATEAU = {
    "_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "patience": 0,
    "factor": 0.5,
    "min_lr": 0.0,
    "monitor": "val/loss",
}


class Probe(L.Callback):
    """Records, at the first training batch of every epoch, what the finetuning callback controls."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        bn = batchnorms(pl_module.backbone)[0]
        opt = trainer.optimizers[0]
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "requires_grad": [p.requires_grad for p in pl_module.backbone.parameters()],
                "bn_training": bn.training,
                "groups": [g.get("name") for g in opt.param_groups],
                "lrs": [g["lr"] for g in opt.param_groups],
                "conv": pl_module.backbone[0].weight.detach().clone(),
                "running_mean": bn.running_mean.clone(),
                "bn_weight": bn.weight.detach().clone(),
            }
        )


def fit(
    data_root: Path,
    max_epochs: int,
    scheduler: dict | None = None,
    ckpt_dir: Path | None = None,
    resume: str | None = None,
    model: dict | None = None,
    **finetune: Any,
) -> tuple[Classifier, Probe]:
    L.seed_everything(0)
    model = model or {"name": "tiny_test_cnn", "pretrained": False}
    pre = model_preprocess(model["name"], model.get("adapt", "native"), None, CIFAR10Data.native_size)
    dm = CIFAR10Data(str(data_root), download=False, val_size=6, num_workers=0, batch_size=8, preprocess=pre)
    module = Classifier(model, dm.classes, ADAM, scheduler)
    probe = Probe()
    callbacks: list[L.Callback] = [StagedFinetuning(**finetune), probe]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True))
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(ckpt_dir),
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module, probe


def test_backbone_is_frozen_then_added_at_the_head_lr_times_ratio(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 3, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    e0, e1, e2 = probe.rows
    assert not any(e0["requires_grad"]) and not any(e1["requires_grad"]) and all(e2["requires_grad"])
    assert e0["groups"] == e1["groups"] == ["head"] and e2["groups"] == ["head", "backbone"]
    assert e2["lrs"][1] == pytest.approx(e2["lrs"][0] * 0.1)
    assert torch.equal(e0["conv"], e2["conv"])  # untouched while frozen
    assert not torch.equal(e2["conv"], module.backbone[0].weight)  # trained once unfrozen


def test_unfreeze_at_zero_trains_everything_from_the_start(tiny_cifar: Path):
    _, probe = fit(tiny_cifar, 1, unfreeze_at_epoch=0, backbone_lr_ratio=0.5)
    assert all(probe.rows[0]["requires_grad"]) and probe.rows[0]["groups"] == ["head", "backbone"]
    assert probe.rows[0]["lrs"] == pytest.approx([0.01, 0.005])


def test_bn_frozen_keeps_pretrained_statistics_through_training_and_validation(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 3, unfreeze_at_epoch=None, bn="frozen")
    bn = batchnorms(module.backbone)[0]
    assert all(not row["bn_training"] for row in probe.rows)
    assert torch.equal(probe.rows[0]["running_mean"], bn.running_mean)
    assert bn.track_running_stats  # unlike Lightning's freeze(train_bn=False), which switches it off
    assert all(row["groups"] == ["head"] for row in probe.rows)


def test_bn_train_adapts_statistics_but_keeps_affine_parameters_frozen(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 2, unfreeze_at_epoch=None, bn="train")
    bn = batchnorms(module.backbone)[0]
    assert all(row["bn_training"] for row in probe.rows)
    assert not torch.equal(probe.rows[0]["running_mean"], bn.running_mean)
    assert torch.equal(probe.rows[0]["bn_weight"], bn.weight)


def test_frozen_bn_returns_to_train_mode_once_unfrozen(tiny_cifar: Path):
    _, probe = fit(tiny_cifar, 2, unfreeze_at_epoch=1, bn="frozen")
    assert [row["bn_training"] for row in probe.rows] == [False, True]


def test_param_groups_and_trainability_survive_resume(tiny_cifar: Path, tmp_path: Path):
    _, first = fit(tiny_cifar, 2, ckpt_dir=tmp_path / "ckpt", unfreeze_at_epoch=1, backbone_lr_ratio=0.1)
    module, probe = fit(
        tiny_cifar, 3, resume=str(tmp_path / "ckpt" / "last.ckpt"), unfreeze_at_epoch=1, backbone_lr_ratio=0.1
    )
    (row,) = probe.rows  # only epoch 2 runs after the restore
    assert row["epoch"] == 2 and row["groups"] == ["head", "backbone"]
    assert row["lrs"] == pytest.approx(first.rows[-1]["lrs"])
    assert all(row["requires_grad"])
    assert not torch.equal(row["conv"], module.backbone[0].weight)  # the backbone still learns after resume


def test_cosine_schedule_drives_the_backbone_group_too(tiny_cifar: Path):
    _, probe = fit(tiny_cifar, 4, scheduler=COSINE, unfreeze_at_epoch=1, backbone_lr_ratio=0.1)
    head = [row["lrs"][0] for row in probe.rows]
    assert head[3] < head[2] < head[1]
    for row in probe.rows[1:]:
        assert row["lrs"][1] == pytest.approx(row["lrs"][0] * 0.1)


def test_plateau_schedule_accepts_the_added_group(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 3, scheduler=PLATEAU, unfreeze_at_epoch=1)
    assert len(module.trainer.lr_scheduler_configs[0].scheduler.min_lrs) == 2
    assert probe.rows[-1]["groups"] == ["head", "backbone"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bn": "sometimes"},
        {"unfreeze_at_epoch": -1},
        {"backbone_lr_ratio": 0},
        {"layer_decay": 0},
        {"layer_decay": 1.5},
    ],
)
def test_bad_finetune_settings_are_config_errors(kwargs: dict):
    with pytest.raises(ConfigError, match="finetune"):
        StagedFinetuning(**kwargs)


def test_neck_trains_with_the_head_and_fixed_convs_never_train(tiny_cifar: Path):
    model = {"name": "tiny_test_neck", "pretrained": False, "freeze_convs": 1}
    module, probe = fit(tiny_cifar, 2, model=model, unfreeze_at_epoch=1)
    opt = module.trainer.optimizers[0]
    head_group, backbone_group = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert all(id(p) in head_group and p.requires_grad for p in module.model.neck.parameters())
    first_conv, second_conv = module.backbone[0], module.backbone[1]
    assert not any(p.requires_grad or id(p) in backbone_group for p in first_conv.parameters())
    assert all(p.requires_grad and id(p) in backbone_group for p in second_conv.parameters())
    assert probe.rows[1]["requires_grad"] == [False, False, True, True, True, True]


ONECYCLE = {
    "_target_": "torch.optim.lr_scheduler.OneCycleLR",
    "max_lr": 0.01,
    "total_steps": None,
    "pct_start": 0.3,
    "interval": "step",
}
WARMUP_COSINE = {
    "_target_": "transfer.training.optim.WarmupCosine",
    "total_steps": None,
    "warmup": 0.3,
    "interval": "step",
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
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in names]
    groups = layer_groups(list(zip(names, params)))
    index = {id(p): i for i, p in enumerate(params)}
    assert [[index[id(p)] for p in g] for g in groups] == [[0, 1], [2, 3], [4, 5, 6]]
    resnet = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight", "layer2.0.conv1.weight"]
    assert [len(g) for g in layer_groups([(n, torch.nn.Parameter(torch.zeros(1))) for n in resnet])] == [2, 1, 1, 1]


def test_layer_decay_gives_deeper_layers_geometrically_lower_rates(tiny_cifar: Path):
    _, probe = fit(tiny_cifar, 1, unfreeze_at_epoch=0, backbone_lr_ratio=0.5, layer_decay=0.25)
    row = probe.rows[0]
    assert row["groups"] == ["head", "backbone.0", "backbone.1"]  # the conv, then the BatchNorm block
    assert row["lrs"] == pytest.approx([0.01, 0.01 * 0.5 * 0.25, 0.01 * 0.5])


@pytest.mark.parametrize("scheduler", [ONECYCLE, WARMUP_COSINE], ids=["onecycle", "warmup_cosine"])
def test_per_step_schedules_span_the_run_and_drive_the_backbone_added_later(tiny_cifar: Path, scheduler: dict):
    module, probe = fit(tiny_cifar, 4, scheduler=scheduler, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    sched = module.trainer.lr_scheduler_configs[0].scheduler
    steps = module.trainer.estimated_stepping_batches
    assert module.trainer.global_step == steps == getattr(sched, "total_steps", steps)  # no hand-entered count
    head = [row["lrs"][0] for row in probe.rows]
    assert head[1] > head[0] and head[3] < head[2] < head[1]  # warm-up in epoch 0-1, then decay
    for row in probe.rows[2:]:
        assert row["lrs"][1] == pytest.approx(row["lrs"][0] * 0.1)  # the backbone follows the same curve
    final = module.trainer.optimizers[0].param_groups
    assert final[1]["lr"] == pytest.approx(final[0]["lr"] * 0.1) and final[0]["lr"] < head[2] / 10


def test_per_step_schedule_without_max_epochs_is_a_config_error():
    from transfer.training.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="max_epochs"):
        build_scheduler(ONECYCLE, opt, total_steps=float("inf"))
