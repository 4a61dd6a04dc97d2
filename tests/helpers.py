"""Helpers the tests import: tiny image folders, the tiny run settings, a real ``transfer.run`` child process."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "ship")


def make_image_folder(root: Path, splits: dict[str, int], size: int = 32, classes=CLASSES, seed: int = 0) -> Path:
    """Write ``splits[name]`` PNGs per class under ``root/name/<class>/``; each class has its own colour."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array([200 if k == c else 40 for k in range(3)], dtype=float)
                img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


# The tiny test CNN (tests/tiny_models.py, registered by the tiny_models fixture or TINY_MAIN) in place of a zoo
# model, without the EMA callback.
TINY_CNN = ["model=resnet18", "model.name=tiny_test_cnn", "model.pretrained=false", "~callbacks.ema"]
TINY = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "finetune.unfreeze_at_epoch=1",
    "data.val_size=6",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.download=false",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@functools.cache
def child_cache() -> str:
    """One decode cache shared by the child processes of a test session: made on first use, removed at exit."""
    path = tempfile.mkdtemp(prefix="transfer-test-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m transfer.run <args>`` as a real child process (errors short, the shared decode cache)."""
    return subprocess.run(
        [sys.executable, "-m", "transfer.run", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "TRANSFER_CACHE": child_cache(), **(env or {})},
    )


def fake_slurm(folder: Path) -> tuple[dict[str, str], Path]:
    """The environment of a one-task SLURM batch job (what ``SLURMEnvironment`` reads; no srun, so the task is the
    process itself) with a stub ``scontrol`` first on ``PATH`` that appends its arguments to a file.

    Returns:
        The environment variables to add, and the file the stub writes.
    """
    bin_dir, calls = folder / "bin", folder / "scontrol.calls"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "transfer",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "127.0.0.1",
    }
    return env, calls
