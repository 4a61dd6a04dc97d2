from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from transfer.conf import CONF_DIR
from transfer.core.errors import ConfigError
from transfer.data import CIFAR10Data
from transfer.models import model_preprocess
from transfer.training.finetune import StagedFinetuning, batchnorms
from transfer.training.module import Classifier
from transfer.training.optim import build_scheduler
from transfer.training.param_groups import GroupPlan

# The tiny test architectures are registered for each test of this module only (conftest.tiny_models).
pytestmark = pytest.mark.usefixtures("tiny_models")
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}
# tiny_test_cnn: the backbone's conv weight decays, its bias and the BatchNorm do not; likewise the head's.
GROUPS = ["head", "head.no_decay", "backbone", "backbone.no_decay"]
COSINE = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 4, "interval": "epoch"}
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
# Never improves after the first epoch (an improvement must beat the best by 1e9): halves every rate each epoch.
PLATEAU = {
    "_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "patience": 0,
    "factor": 0.5,
    "threshold": 1e9,
    "threshold_mode": "abs",
    "min_lr": 0.0,
    "monitor": "val/loss",
}


class Probe(L.Callback):
    """Records, at every training batch, what the finetuning callback and the schedule control."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.steps: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        self.steps.append([g["lr"] for g in opt.param_groups])
        if batch_idx:
            return
        bn = batchnorms(pl_module.backbone)[0]
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "requires_grad": [p.requires_grad for p in pl_module.backbone.parameters()],
                "optimizer_state": [len(opt.state.get(p, {})) for p in pl_module.backbone.parameters()],
                "bn_training": bn.training,
                "groups": [g.get("name") for g in opt.param_groups],
                "lrs": [g["lr"] for g in opt.param_groups],
                "conv": pl_module.backbone[0].weight.detach().clone(),
                "running_mean": bn.running_mean.clone(),
                "bn_weight": bn.weight.detach().clone(),
            }
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready == 1:  # first step of the epoch
            self.rows[-1]["grads"] = [p.grad is not None for p in pl_module.backbone.parameters()]


def fit(
    data_root: Path,
    max_epochs: int,
    scheduler: dict | None = None,
    ckpt_dir: Path | None = None,
    resume: str | None = None,
    model: dict | None = None,
    optimizer: dict | None = None,
    **finetune: Any,
) -> tuple[Classifier, Probe]:
    L.seed_everything(0)
    model = model or {"name": "tiny_test_cnn", "pretrained": False}
    pre = model_preprocess(model["name"], model.get("adapt", "native"), None, CIFAR10Data.native_size)
    dm = CIFAR10Data(str(data_root), download=False, val_size=6, num_workers=0, batch_size=8, preprocess=pre)
    module = Classifier(model, dm.classes, optimizer or ADAM, scheduler)
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


def test_frozen_backbone_has_no_grads_no_optimizer_state_and_lr_zero_until_it_trains(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 3, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    e0, e1, e2 = probe.rows
    assert not any(e0["requires_grad"]) and not any(e1["requires_grad"]) and all(e2["requires_grad"])
    assert not any(e0["grads"] + e1["grads"]) and all(e2["grads"])
    assert not any(e1["optimizer_state"])  # no momentum, no weight decay while frozen
    assert e0["groups"] == e1["groups"] == e2["groups"] == GROUPS  # one layout from the first step
    assert e0["lrs"] == e1["lrs"] == pytest.approx([0.01, 0.01, 0.0, 0.0])
    assert e2["lrs"] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    assert torch.equal(e0["conv"], e2["conv"])  # untouched while frozen
    assert not torch.equal(e2["conv"], module.backbone[0].weight)  # trained once unfrozen


def test_unfreeze_at_zero_never_touches_requires_grad(tiny_cifar: Path, monkeypatch: pytest.MonkeyPatch):
    switched: list[tuple[torch.Tensor, bool]] = []  # the tensors kept: their ids stay theirs
    original = torch.Tensor.requires_grad_

    def spy(self: torch.Tensor, flag: bool = True) -> torch.Tensor:
        switched.append((self, flag))
        return original(self, flag)

    monkeypatch.setattr(torch.Tensor, "requires_grad_", spy)
    model = {"name": "tiny_test_neck", "pretrained": False, "frozen_layers": 1}
    module, probe = fit(tiny_cifar, 1, model=model, unfreeze_at_epoch=0, backbone_lr_ratio=0.5)
    own = {id(p) for p in module.parameters()}  # not the folded copies evaluation runs
    assert [flag for t, flag in switched if id(t) in own] == [False, False]  # fixing the first conv, nothing after
    assert probe.rows[0]["requires_grad"] == [False, False, True, True, True, True]
    assert probe.rows[0]["lrs"] == pytest.approx([0.01, 0.01, 0.005, 0.005])
    grouped = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in grouped for p in module.backbone[0].parameters())  # fixed: in no group


def test_bn_frozen_keeps_pretrained_statistics_through_training_and_validation(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 3, unfreeze_at_epoch=None, bn="frozen")
    bn = batchnorms(module.backbone)[0]
    assert all(not row["bn_training"] for row in probe.rows)
    assert torch.equal(probe.rows[0]["running_mean"], bn.running_mean)
    assert bn.track_running_stats  # unlike Lightning's freeze(train_bn=False), which switches it off
    assert all(row["groups"] == ["head", "head.no_decay"] for row in probe.rows)  # a linear probe


def test_bn_train_adapts_statistics_but_keeps_affine_parameters_frozen(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 2, unfreeze_at_epoch=None, bn="train")
    bn = batchnorms(module.backbone)[0]
    assert all(row["bn_training"] for row in probe.rows)
    assert not torch.equal(probe.rows[0]["running_mean"], bn.running_mean)
    assert torch.equal(probe.rows[0]["bn_weight"], bn.weight)


def test_frozen_bn_returns_to_train_mode_once_unfrozen(tiny_cifar: Path):
    _, probe = fit(tiny_cifar, 2, unfreeze_at_epoch=1, bn="frozen")
    assert [row["bn_training"] for row in probe.rows] == [False, True]


def test_bn_frozen_without_frozen_epochs_warns_once(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="transfer.training.finetune"):
        StagedFinetuning(unfreeze_at_epoch=0, bn="frozen")
        StagedFinetuning(unfreeze_at_epoch=1, bn="frozen")
        StagedFinetuning(unfreeze_at_epoch=0, bn="train")
    (record,) = caplog.records
    assert "finetune.bn=frozen has no effect" in record.getMessage()


def test_param_groups_and_trainability_survive_resume(tiny_cifar: Path, tmp_path: Path):
    _, first = fit(tiny_cifar, 2, ckpt_dir=tmp_path / "ckpt", unfreeze_at_epoch=1, backbone_lr_ratio=0.1)
    module, probe = fit(
        tiny_cifar, 3, resume=str(tmp_path / "ckpt" / "last.ckpt"), unfreeze_at_epoch=1, backbone_lr_ratio=0.1
    )
    (row,) = probe.rows  # only epoch 2 runs after the restore
    assert row["epoch"] == 2 and row["groups"] == GROUPS
    assert row["lrs"] == pytest.approx(first.rows[-1]["lrs"]) and row["lrs"][2] == pytest.approx(0.001)
    assert all(row["requires_grad"])
    assert not torch.equal(row["conv"], module.backbone[0].weight)  # the backbone still learns after resume


def test_resume_with_other_param_groups_is_a_config_error(tiny_cifar: Path, tmp_path: Path):
    fit(tiny_cifar, 1, ckpt_dir=tmp_path / "ckpt", unfreeze_at_epoch=1)
    with pytest.raises(ConfigError, match="param groups"):
        fit(tiny_cifar, 2, resume=str(tmp_path / "ckpt" / "last.ckpt"), unfreeze_at_epoch=1, layer_decay=0.5)


@pytest.mark.parametrize(
    "scheduler", [ONECYCLE, WARMUP_COSINE, COSINE, None], ids=["onecycle", "warmup_cosine", "cosine", "none"]
)
def test_every_groups_schedule_is_defined_from_the_start(tiny_cifar: Path, scheduler: dict | None):
    """Frozen for two epochs, the backbone's lr is 0; from the unfreeze on it is at every step what it would
    be had it trained from the start (the schedule's value, peak included, x the ratio), and the head's
    schedule does not notice the freeze at all."""
    _, staged = fit(tiny_cifar, 4, scheduler=scheduler, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    _, whole = fit(tiny_cifar, 4, scheduler=scheduler, unfreeze_at_epoch=0, backbone_lr_ratio=0.1)
    frozen_steps = 2 * 3  # 30 images in batches of 8, last partial batch dropped: 3 steps per epoch
    assert len(staged.steps) == len(whole.steps) == 4 * 3
    for step, (got, want) in enumerate(zip(staged.steps, whole.steps, strict=True)):
        expected = want if step >= frozen_steps else [want[0], want[1], 0.0, 0.0]
        assert got == pytest.approx(expected), step
        assert want[2] == pytest.approx(want[0] * 0.1)
    if scheduler is not None:
        head = [lrs[0] for lrs in whole.steps]
        assert len(set(head)) > 3  # the schedule did move the rates


@pytest.mark.parametrize("scheduler", [ONECYCLE, WARMUP_COSINE], ids=["onecycle", "warmup_cosine"])
def test_per_step_schedules_span_the_run(tiny_cifar: Path, scheduler: dict):
    module, probe = fit(tiny_cifar, 4, scheduler=scheduler, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    sched = module.trainer.lr_scheduler_configs[0].scheduler
    steps = module.trainer.estimated_stepping_batches
    assert module.trainer.global_step == steps == getattr(sched, "total_steps", steps)  # no hand-entered count
    head = [lrs[0] for lrs in probe.steps]
    peak = head.index(max(head))
    assert 0 < peak < len(head) - 1 and head[-1] < max(head) / 10  # warm-up, then decay
    assert max(head) == pytest.approx(0.01, rel=0.05)
    final = module.trainer.optimizers[0].param_groups
    assert final[2]["lr"] == pytest.approx(final[0]["lr"] * 0.1)


def test_plateau_reductions_act_on_every_group_frozen_or_not(tiny_cifar: Path):
    module, probe = fit(tiny_cifar, 4, scheduler=PLATEAU, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    head = [0.01, 0.01, 0.005, 0.0025]  # no reduction after the first epoch, one after each later one
    assert [row["lrs"] for row in probe.rows] == [
        pytest.approx([h, h, b, b]) for h, b in zip(head, [0.0, 0.0, 0.0005, 0.00025], strict=True)
    ]
    assert isinstance(module.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _two_groups() -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1, "lr_scale": 1.0, "trains_from": 0},
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01, "lr_scale": 0.1, "trains_from": 1},
        ],
        lr=0.1,
    )


def test_the_gate_opens_at_the_scheduled_rate_and_survives_a_save_and_load():
    opt = _two_groups()
    sched = build_scheduler(COSINE, opt)["scheduler"]  # type: ignore[index]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]
    opt.step()
    sched.step()
    sched.set_epoch(1)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * 0.1) and 0 < lrs[0] < 0.1
    again = _two_groups()
    restored = build_scheduler(COSINE, again)["scheduler"]  # type: ignore[index]
    again.load_state_dict(opt.state_dict())
    restored.load_state_dict(sched.state_dict())
    for optimizer, scheduler in ((opt, sched), (again, restored)):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]
    assert restored.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_constant_rates_with_nothing_frozen_need_no_scheduler():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "trains_from": 0}], lr=0.1)
    assert build_scheduler(None, opt) is None


def test_the_plan_is_logged_once_at_fit_start(tiny_cifar: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="transfer.training.module"):
        fit(tiny_cifar, 1, unfreeze_at_epoch=2, backbone_lr_ratio=0.1)
    (line,) = [r.getMessage() for r in caplog.records if "param groups" in r.getMessage()]
    assert "4 param groups" in line and "head lr 0.01" in line
    assert "backbone lr 0.001, frozen for 2 epoch(s), trained from epoch 3" in line and "deepest" not in line


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


def test_the_callbacks_defaults_are_the_configs():
    cfg = OmegaConf.load(Path(CONF_DIR) / "finetune" / "staged.yaml")
    default = StagedFinetuning()
    assert default.plan == GroupPlan() == GroupPlan(cfg.unfreeze_at_epoch, cfg.backbone_lr_ratio, cfg.layer_decay)
    assert default.bn == cfg.bn


def test_neck_trains_with_the_head_and_fixed_convs_never_train(tiny_cifar: Path):
    model = {"name": "tiny_test_neck", "pretrained": False, "frozen_layers": 1}
    module, probe = fit(tiny_cifar, 2, model=model, unfreeze_at_epoch=1)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in module.trainer.optimizers[0].param_groups}
    head = groups["head"] | groups["head.no_decay"]
    backbone = groups["backbone"] | groups["backbone.no_decay"]
    assert all(id(p) in head and p.requires_grad for p in module.model.neck.parameters())
    first_conv, second_conv = module.backbone[0], module.backbone[1]
    assert not any(p.requires_grad or id(p) in backbone for p in first_conv.parameters())
    assert all(p.requires_grad and id(p) in backbone for p in second_conv.parameters())
    assert probe.rows[0]["requires_grad"] == [False] * 6
    assert probe.rows[1]["requires_grad"] == [False, False, True, True, True, True]


def test_layer_decay_gives_deeper_layers_geometrically_lower_rates(tiny_cifar: Path):
    _, probe = fit(tiny_cifar, 1, unfreeze_at_epoch=0, backbone_lr_ratio=0.5, layer_decay=0.25)
    row = probe.rows[0]
    # the conv (its weight; its bias without decay), then the BatchNorm block (1-d only)
    assert row["groups"] == ["head", "head.no_decay", "backbone.0", "backbone.0.no_decay", "backbone.1.no_decay"]
    assert row["lrs"] == pytest.approx([0.01, 0.01, 0.01 * 0.5 * 0.25, 0.01 * 0.5 * 0.25, 0.01 * 0.5])


def test_per_step_schedule_without_max_epochs_is_a_config_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="max_epochs"):
        build_scheduler(ONECYCLE, opt, total_steps=float("inf"))


def test_a_scheduler_target_that_is_not_a_scheduler_class_is_a_config_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="not an lr scheduler class"):
        build_scheduler({"_target_": "builtins.dict"}, opt)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_fused_optimizer_steps_fused_unless_gradients_are_clipped_in_mixed_precision(
    tiny_cifar: Path, clip: float | None, caplog: pytest.LogCaptureFixture
):
    # Lightning refuses to clip in mixed precision with an optimizer that unscales inside its step (a fused one).
    caplog.set_level("INFO", logger="transfer.training.module")
    L.seed_everything(0)
    pre = model_preprocess("tiny_test_cnn", "native", None, CIFAR10Data.native_size)
    dm = CIFAR10Data(str(tiny_cifar), download=False, val_size=6, num_workers=0, batch_size=8, preprocess=pre)
    model = {"name": "tiny_test_cnn", "pretrained": False}
    module = Classifier(model, dm.classes, {**ADAM, "fused": True}, None)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=clip,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert {g["fused"] for g in trainer.optimizers[0].param_groups} == {clip is None}
    assert caplog.text.count("unfused, as gradient clipping") == (clip is not None)


@pytest.mark.parametrize("fused", [True, False])
def test_a_resumed_optimizer_steps_with_this_runs_kernel(tiny_cifar: Path, tmp_path: Path, fused: bool):
    fit(tiny_cifar, 1, ckpt_dir=tmp_path / "ckpt", optimizer={**ADAM, "fused": not fused}, unfreeze_at_epoch=0)
    module, _ = fit(
        tiny_cifar,
        2,
        ckpt_dir=tmp_path / "resumed",
        resume=str(tmp_path / "ckpt" / "last.ckpt"),
        optimizer={**ADAM, "fused": fused},
        unfreeze_at_epoch=0,
    )
    optimizer = module.trainer.optimizers[0]
    assert {g["fused"] for g in optimizer.param_groups} == {fused}
    assert {int(s["step"]) for s in optimizer.state.values()} == {2 * module.trainer.num_training_batches}


def test_an_optimizer_without_a_fused_kernel_keeps_the_other_settings_and_trains(tiny_cifar: Path):
    # optimizer._target_=torch.optim.RMSprop beside adamw.yaml's keys, fused among them
    module, _ = fit(tiny_cifar, 1, optimizer={"_target_": "torch.optim.RMSprop", "lr": 0.01, "fused": True})
    optimizer = module.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.RMSprop) and module.trainer.global_step > 0
