"""Scale, simulated on one machine (``-m slow``: real child processes, ~30-60 s each test).

A 2-node x 1-process gloo run launched the way a cluster launches one (each node's process started by hand with
``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, which Lightning's
``LightningEnvironment`` reads), compared with a single process on the same global batch; and SLURM's
auto-requeue (SIGUSR1 -> ``hpc_ckpt_<n>.ckpt`` + ``scontrol requeue <job id>``) with a faked SLURM environment
and a stub ``scontrol``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import child_cache, fake_slurm, make_image_folder
from tests.tiny_models import TINY_MAIN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# One optimizer step on the whole train split (8 images): 2 ranks x 4 images, or 1 process x 8. Nothing differs
# between the two but the summation order: no augmentation, no dropout, the backbone frozen with its BatchNorm in
# eval mode (in train mode each rank would normalise by its own 4 images' statistics, and SyncBatchNorm works
# on GPUs only), so each image's gradient of the head is the same in both runs and DDP's average of the two
# half-batch means is the full batch's mean; plain SGD, because Adam's first step divides a gradient by its own
# magnitude and would turn a rounding difference near zero into a full lr-sized step.
RUN = [
    "model=resnet18",
    "model.name=tiny_test_cnn",
    "model.pretrained=false",
    "~callbacks.ema",
    "optimizer=sgd",
    "optimizer.lr=1.0",  # a large step with no schedule, so that a wrong gradient would land far away
    "scheduler=none",
    "trainer=ddp_cpu",
    "trainer.devices=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.enable_progress_bar=false",
    "finetune.unfreeze_at_epoch=1",
    "finetune.bn=frozen",
    "finetune.cache_features=false",
    "data.augment.crop_padding=0",
    "data.augment.hflip=false",
    "data.val_size=4",
    "data.num_workers=0",
    "data.download=false",
]
# Float32 sums in another order (the all-reduce adds two half-batch means; one process sums all 8 at once):
# differences of a few ulps (~1e-7 relative) in gradients of order 0.1, times lr 1, on weights of order 0.1-1.
# A step on other images moves the head by orders of magnitude more (checked below with half the batch).
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TINY_MAIN, *args],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "TRANSFER_CACHE": child_cache(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_two_nodes_of_one_process_train_the_model_one_process_trains_on_the_same_global_batch(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", {"train": 4, "test": 1})  # 12 images: 8 train, 4 val
    port = free_port()
    multi = tmp_path / "two_nodes"
    nodes = [
        tiny_run(
            [*RUN, f"data.root={root}", f"hydra.run.dir={multi}", "trainer.num_nodes=2", "data.batch_size=4"],
            env={
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "NODE_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
            },
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2
    assert summary["distributed"]["weights_identical_across_ranks"] is True  # both ranks' digests, bit for bit
    assert torch.load(multi / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    two, one = weights(multi), one_process(root, tmp_path / "one_process", batch_size=8)
    assert two.keys() == one.keys()
    worst = max(float((two[k] - one[k]).abs().max()) for k in two)
    assert worst < TOLERANCE, worst
    half = one_process(root, tmp_path / "half_batch", batch_size=4)  # one step on 4 of the 8 images
    assert max(float((half[k] - one[k]).abs().max()) for k in one) > 100 * TOLERANCE  # the check can tell


def one_process(root: Path, run_dir: Path, batch_size: int) -> dict[str, torch.Tensor]:
    """The weights after one single-process step on ``batch_size`` images."""
    proc = tiny_run([*RUN, f"data.root={root}", f"hydra.run.dir={run_dir}", "trainer.num_nodes=1",
                     f"data.batch_size={batch_size}"])  # fmt: skip
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    return weights(run_dir)


def test_sigusr1_on_slurm_saves_an_hpc_checkpoint_and_requeues_the_job(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", {"train": 4, "test": 1})
    slurm, calls = fake_slurm(tmp_path)
    slurm["MASTER_PORT"] = str(free_port())
    run_dir = tmp_path / "run"
    args = [*RUN, "trainer=cpu", f"data.root={root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=100000"]
    proc = tiny_run([a for a in args if not a.startswith(("trainer=ddp_cpu", "trainer.sync", "trainer.devices"))],
                    env=slurm)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        assert (run_dir / "checkpoints" / "last.ckpt").exists(), "no epoch finished in 240 s"
        proc.send_signal(signal.SIGUSR1)  # lands anywhere in an epoch: logging, validation, a checkpoint write
        deadline = time.monotonic() + 60
        while not calls.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        state = "still running" if proc.poll() is None else f"exited with {proc.returncode}"
        assert calls.exists(), f"scontrol was never called; the run is {state}"
        assert calls.read_text().split() == ["requeue", "4242"]
        assert list(run_dir.rglob("hpc_ckpt_*.ckpt")), sorted(p.name for p in run_dir.rglob("*.ckpt"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
