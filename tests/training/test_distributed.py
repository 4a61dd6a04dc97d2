"""Staged fine-tuning under DDP: the helpers' arithmetic with a stand-in for the other rank (default suite), and a
real 2-process gloo run (``-m slow``: two interpreters start, ~25 s)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers import make_image_folder, run
from tests.in_process import run_tool
from transfer.training import distributed, finetune
from transfer.training.module import Classifier
from transfer.training.param_groups import build_param_groups


def trainer(world_size: int, gather=None) -> SimpleNamespace:
    """What the helpers read of a Lightning trainer; ``gather`` plays ``strategy.all_gather`` across the ranks."""
    return SimpleNamespace(
        world_size=world_size, strategy=SimpleNamespace(root_device=torch.device("cpu"), all_gather=gather)
    )


def test_gradients_ddp_does_not_average_are_averaged_over_the_ranks(monkeypatch: pytest.MonkeyPatch):
    wrapped, unfrozen = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))  # unfrozen after DDP wrapped
    wrapped.grad, unfrozen.grad = torch.full((2,), 4.0), torch.full((3,), 2.0)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda flat: flat.add_(6.0))  # the other rank's gradient: 6
    distributed.sync_unregistered_grads(trainer(2), [wrapped, unfrozen], registered={id(wrapped)})
    assert torch.equal(unfrozen.grad, torch.full((3,), 4.0))  # (2 + 6) / 2
    assert torch.equal(wrapped.grad, torch.full((2,), 4.0))  # DDP's own: left alone
    distributed.sync_unregistered_grads(trainer(1), [unfrozen], registered=set())
    assert torch.equal(unfrozen.grad, torch.full((3,), 4.0))  # one process: nothing to average


def test_weights_in_sync_compares_every_ranks_digest():
    module = nn.Linear(3, 2)
    assert distributed.weights_in_sync(trainer(2, lambda mine: torch.cat([mine, mine])), module) is True
    assert distributed.weights_in_sync(trainer(2, lambda mine: torch.cat([mine, mine + 1])), module) is False
    assert distributed.weights_in_sync(trainer(1), module) is None
    assert distributed.ddp_registered(trainer(2), module) is None  # not DDP-wrapped: nothing registered


@pytest.mark.usefixtures("tiny_models")
@pytest.mark.parametrize("unfreeze", [0, 1])
def test_only_a_backbone_unfrozen_after_the_ddp_wrap_is_averaged_by_hand(
    unfreeze: int, monkeypatch: pytest.MonkeyPatch
):
    """With nothing frozen DDP registers every parameter and no gradient is all-reduced by hand; with a late
    unfreeze exactly the backbone's (frozen when DDP wrapped the model) are, from the unfreeze epoch on."""
    module = Classifier({"name": "tiny_test_cnn", "pretrained": False}, ["a", "b"], {"lr": 0.1})
    callback = finetune.StagedFinetuning(unfreeze_at_epoch=unfreeze)
    run = SimpleNamespace(optimizers=[], lr_scheduler_configs=[], current_epoch=0, world_size=2)
    callback.setup(run, module, "fit")  # type: ignore[arg-type]
    groups = build_param_groups(module.model, callback.plan, lr=0.1)
    run.optimizers = [torch.optim.SGD(groups, lr=0.1)]
    # DDP registers what requires gradients when it wraps: between the callback's setup and on_fit_start
    monkeypatch.setattr(finetune, "ddp_registered", lambda t, m: {id(p) for p in m.parameters() if p.requires_grad})
    averaged: list[list[nn.Parameter]] = []
    monkeypatch.setattr(finetune, "sync_unregistered_grads", lambda t, params, registered: averaged.append(params))
    callback.on_fit_start(run, module)  # type: ignore[arg-type]
    for epoch in range(3):
        run.current_epoch = epoch
        callback.on_train_epoch_start(run, module)  # type: ignore[arg-type]
        callback.on_after_backward(run, module)  # type: ignore[arg-type]
    backbone = {id(p) for p in module.backbone.parameters()}
    assert [{id(p) for p in params} for params in averaged] == ([] if unfreeze == 0 else [backbone, backbone])


@pytest.mark.slow
def test_two_process_cpu_ddp_run_ends_with_identical_weights_on_both_ranks(tmp_path: Path):
    """gloo DDP, 2 ranks, backbone unfrozen in the second epoch: DDP wrapped the model while the backbone was
    frozen, so only the finetuning callback's own all-reduce keeps the ranks' backbones equal. The frozen
    epoch runs on cached features (rank 0 computes them, rank 1 waits and reads the file)."""
    root = make_image_folder(tmp_path / "data", {"train": 12, "test": 4})
    run_dir = tmp_path / "run"
    proc = run(
        "model=lenet5",
        "model.pretrained=false",
        f"data.root={root}",
        f"hydra.run.dir={run_dir}",
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "finetune.unfreeze_at_epoch=1",
        "finetune.cache_features=true",
        "data.val_size=6",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.download=false",
        "trainer.enable_progress_bar=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distributed"] == {
        "world_size": 2,
        "strategy": "DDPStrategy",
        "weights_identical_across_ranks": True,
    }
    assert summary["epochs_run"] == 2
    assert abs(summary["test_acc"] * 12 - round(summary["test_acc"] * 12)) < 1e-4  # a share of the 12 test images
    assert proc.stdout.count("test accuracy") == 1  # one summary line, from rank 0
    history = json.loads((run_dir / "history.json").read_text())
    assert "lr/backbone" in history["epochs"][-1]  # the unfreeze happened under DDP
    log = "".join(f.read_text() for f in run_dir.glob("*.log")) + proc.stderr  # rank 1 logs to its own file
    assert "train features computed" in log and "train features loaded" in log  # one rank each


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error under test exists only without a GPU")
def test_gpu_ddp_on_a_machine_without_gpus_points_to_the_cpu_variant(tiny_cifar: Path, tmp_path: Path):
    proc = run_tool(
        "transfer.run",
        "model=lenet5",
        "model.pretrained=false",
        f"data.root={tiny_cifar}",
        f"hydra.run.dir={tmp_path / 'r'}",
        "trainer=ddp",
        "data.download=false",
    )
    assert proc.returncode == 2 and "trainer=ddp_cpu" in proc.stderr and "Traceback" not in proc.stderr
