"""What only a CUDA GPU exercises: bf16 autocast, torch.compile, channels-last kernels and the NCCL DDP path.

Marked ``gpu``: skipped ("needs a CUDA GPU") where ``torch.cuda.is_available()`` is false, run where it is true
(tests/conftest.py). Each uses the tiny test architecture in this process, so a run takes seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import TINY
from tests.in_process import run_tool
from transfer.training.compute import apply_compute
from transfer.training.module import Classifier

pytestmark = pytest.mark.gpu

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2}
TINY_MODEL = {"name": "tiny_test_cnn", "pretrained": False}


@pytest.fixture
def threads() -> Iterator[int]:
    """apply_compute sets torch's thread count: give it the current one and restore it afterwards."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _batches(n: int = 16, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3), batch_size=8)


class LossRecord(L.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(
    module: Classifier, steps: int, precision: str, ckpt_dir: Path | None = None, resume: Path | None = None
) -> LossRecord:
    """Train ``module`` for ``steps`` steps on the GPU (checkpointing into ``ckpt_dir`` when given); its losses."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    record = LossRecord()
    checkpoints = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True)] if ckpt_dir else []
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=bool(checkpoints),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, *checkpoints],
    )
    trainer.fit(module, _batches(), ckpt_path=resume)
    return record


def test_bf16_mixed_training_steps_have_a_finite_loss_and_move_the_weights(tiny_models):
    module = Classifier(TINY_MODEL, ["a", "b", "c"], ADAM)
    before = [p.detach().clone() for p in module.parameters()]
    record = _fit(module, 2, "bf16-mixed")
    assert len(record.losses) == 2 and all(math.isfinite(loss) for loss in record.losses)
    after = [p.detach().cpu() for p in module.parameters()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # every tensor was trained


def test_an_unfused_checkpoint_resumes_fused_under_a_loss_scaler(tiny_models, tmp_path: Path):
    # The fused kernel keeps its step counters on the GPU and unscales inside its step: the restored state must be
    # laid out for it, and GradScaler must step it as a fused optimizer.
    _fit(Classifier(TINY_MODEL, ["a", "b", "c"], {**ADAM, "fused": False}), 2, "32-true", tmp_path / "a")
    module = Classifier(TINY_MODEL, ["a", "b", "c"], {**ADAM, "fused": True})
    record = _fit(module, 4, "16-mixed", tmp_path / "b", resume=tmp_path / "a" / "last.ckpt")
    optimizer = module.trainer.optimizers[0]
    assert len(record.losses) == 2 and all(math.isfinite(loss) for loss in record.losses)
    assert {g["fused"] for g in optimizer.param_groups} == {True}
    # continued from the checkpoint's 2 steps; the loss scaler may skip a step whose fp16 gradients overflowed
    assert all(s["step"].device.type == "cuda" and 2 < int(s["step"]) <= 4 for s in optimizer.state.values())


def _eager_and_changed(changes: dict[str, Any], threads: int) -> tuple[torch.Tensor, torch.Tensor, Classifier]:
    """Logits of one batch before and after ``apply_compute(**changes)`` on the GPU."""
    module = Classifier(TINY_MODEL, ["a", "b", "c"], ADAM).cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager = module(x)
        apply_compute(module.model, num_threads=threads, **changes)
        changed = module(x.contiguous(memory_format=torch.channels_last) if changes.get("channels_last") else x)
    return eager, changed, module


def test_compiled_model_gives_the_eager_logits(tiny_models, threads: int):
    eager, compiled, module = _eager_and_changed({"channels_last": False, "compile": True}, threads)
    assert module.model._compiled_call_impl is not None  # compute.compile=true's path really compiled it
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_channels_last_model_gives_the_nchw_logits(tiny_models, threads: int):
    nchw, nhwc, module = _eager_and_changed({"channels_last": True}, threads)
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-3, atol=1e-4)


@pytest.fixture
def process_group() -> Iterator[None]:
    """The DDP run leaves its process group behind; later tests in this process must not see one."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_one_device_ddp_run_completes(tiny_models, tiny_cifar: Path, tmp_path: Path, process_group: None):
    run_dir = tmp_path / "run"
    proc = run_tool(
        "transfer.run",
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "trainer=ddp",
        "trainer.devices=1",
        f"data.root={tiny_cifar}",
        f"hydra.run.dir={run_dir}",
        *[arg for arg in TINY if not arg.startswith("trainer=")],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0 and list((run_dir / "checkpoints").glob("*.ckpt"))
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1  # it ran as DDP
