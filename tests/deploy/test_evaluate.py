"""``transfer.evaluate`` as a tool: ``limit=`` scores a stated subset, and a signal stops it with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, child_cache
from tests.in_process import run_tool

ROOT = Path(__file__).resolve().parents[2]
DATA = ["data.num_workers=0", "data.download=false"]


@pytest.fixture
def tiny_trained(tiny_models, compose_cfg, tmp_path: Path) -> Path:
    """A finished one-epoch tiny_test_cnn run on 3 classes with 8 test images each; returns its run directory."""
    from tests.helpers import make_image_folder
    from transfer.training.train import train

    root = make_image_folder(tmp_path / "data", {"train": 12, "test": 8})
    cfg = compose_cfg(
        "model=resnet18",
        "model.name=tiny_test_cnn",
        "model.pretrained=false",
        "~callbacks.ema",
        f"data.root={root}",
        *TINY,
        "trainer.max_epochs=1",
    )
    train(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_limit_scores_a_class_stratified_subset_and_says_how_many_of_the_split(tiny_trained: Path, tmp_path: Path):
    outputs = []
    for name, limit in (("a", "6"), ("b", "6"), ("c", "0.25")):
        proc = run_tool(
            "transfer.evaluate", f"ckpt={tiny_trained}", f"limit={limit}", *DATA, f"hydra.run.dir={tmp_path / name}"
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    six, again, quarter = outputs
    assert six["n"] == 6 and six["split_size"] == 24 and "class-stratified" in six["scored"]
    assert [m["support"] for m in six["per_class"].values()] == [2, 2, 2]  # every class, in proportion
    assert six["confusion"] == again["confusion"]  # seeded: the same images each time
    assert quarter["n"] == 6  # a quarter of 24
    report = (tmp_path / "a" / "report.md").read_text()
    assert "on 6 of the split's 24 images (a class-stratified subset drawn with limit_seed=0)" in report

    whole = run_tool("transfer.evaluate", f"ckpt={tiny_trained}", *DATA, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["n"] == metrics["split_size"] == 24 and metrics["scored"] == "every image"


@pytest.mark.parametrize("limit", ["0", "-3", "1.5", "true", "abc"])
def test_a_bad_limit_is_one_paragraph_exit_2_before_anything_is_loaded(tmp_path: Path, limit: str):
    proc = run_tool(
        "transfer.evaluate", f"ckpt={tmp_path / 'absent'}", f"limit={limit}", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert proc.returncode == 2 and "must be a whole number of images" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "e" / "metrics.json").exists()


# `python -m transfer.evaluate` with the tiny architectures registered and each prediction batch slowed down, so
# that the signal lands while images are being scored; "scoring" on stderr says the first batch has started.
SLOW_EVALUATE = (
    "import sys, time; sys.argv[0] = 'transfer.evaluate'; from tests.tiny_models import TINY_ARCHS; "
    "from transfer.models import register; [register(a) for a in TINY_ARCHS]; "
    "from transfer.training.module import Classifier; real = Classifier.predict_step\n"
    "def slow(self, *a, **k):\n"
    "    print('scoring', file=sys.stderr, flush=True); time.sleep(0.5); return real(self, *a, **k)\n"
    "Classifier.predict_step = slow; from transfer.evaluate import main; main()"
)


@pytest.mark.slow  # a real child process: ~15 s of imports
def test_sigterm_while_scoring_exits_143_with_one_stop_line_and_no_report(tiny_trained: Path, tmp_path: Path):
    out = tmp_path / "eval"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_EVALUATE,
            f"ckpt={tiny_trained}",
            *DATA,
            "data.eval_batch_size=1",
            f"hydra.run.dir={out}",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "TRANSFER_CACHE": child_cache()},
    )
    assert proc.stderr is not None
    deadline = time.time() + 240
    while time.time() < deadline and "scoring" not in proc.stderr.readline():
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stops) == 1 and "no report was written" in stops[0] and "Traceback" not in err
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()
