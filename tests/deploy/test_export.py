"""Export to ONNX/TorchScript with a parity check, and prediction from the exported ONNX file."""

from __future__ import annotations

import copy
import json
import subprocess
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import CLASSES, make_image_folder
from tests.in_process import run_tool
from transfer.core.errors import ConfigError
from transfer.models import model_preprocess
from transfer.training.module import Classifier

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}
EXPORT_CFG = {"format": "onnx", "out": None, "opset": 17, "parity": {"images": "auto", "count": 64, "atol": 1e-4}}


def make_run(run_dir: Path, data_root: Path | None = None, model: str = "lenet5", steps: int = 2) -> Path:
    """A run directory as ``transfer.run`` leaves it (``checkpoints/last.ckpt``, ``config.yaml``), made in seconds:
    a packaged architecture trained ``steps`` steps on random images. Returns the checkpoint."""
    L.seed_everything(0)
    module = Classifier(
        {"name": model, "pretrained": False},
        list(CLASSES),
        ADAM,
        preprocess=model_preprocess(model, "native", None, 32).to_dict(),
    )
    data = TensorDataset(torch.randn(8 * steps, 3, 32, 32), torch.randint(0, len(CLASSES), (8 * steps,)))
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You defined a `validation_step` but have no `val_dataloader`")  # on purpose
        trainer.fit(module, DataLoader(data, batch_size=8))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    OmegaConf.save(
        {"data": {"root": str(data_root) if data_root else None}, "model": {"name": model}}, run_dir / "config.yaml"
    )
    return ckpt


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in this process (tests/in_process.py)."""
    return run_tool(module, *args)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run_dir, data_root)``: a LeNet-5 run whose config points at a tiny image folder (3 classes)."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "tiny", {"train": 4, "test": 5})
    run_dir = tmp_path_factory.mktemp("runs") / "lenet"
    make_run(run_dir, root)
    return run_dir, root


def test_onnx_export_passes_parity_on_the_runs_images_and_predicts_like_the_checkpoint(tiny_run, tmp_path):
    run_dir, root = tiny_run
    proc = cli("transfer.export", f"ckpt={run_dir}", "format=onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    onnx_path = run_dir / "export" / "last.onnx"
    info = json.loads((run_dir / "export" / "last.onnx.json").read_text())
    assert info["class_names"] == list(CLASSES) and info["input"]["shape"] == ["batch", 3, 32, 32]
    assert info["preprocess"]["image_size"] == 32 and len(info["preprocess"]["mean"]) == 3
    parity = info["parity"]
    assert parity["passed"] and parity["images"] == 15 and parity["top1_agree"] == 15
    assert "real images" in parity["source"] and parity["max_abs_prob_diff"] <= 1e-4
    assert "top-1 15/15" in proc.stdout

    results = {}
    for name, ckpt in (("ckpt", run_dir), ("onnx", onnx_path)):
        pred = cli("transfer.predict", f"ckpt={ckpt}", f"images={root / 'test'}", "topk=3", f"out={tmp_path / name}")
        assert pred.returncode == 0, pred.stderr[-2000:]
        results[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    assert [r["label"] for r in results["onnx"]] == [r["label"] for r in results["ckpt"]]
    for a, b in zip(results["onnx"], results["ckpt"], strict=True):
        assert [c for c, _ in a["topk"]] == [c for c, _ in b["topk"]]
        assert all(abs(pa - pb) <= 1e-4 for (_, pa), (_, pb) in zip(a["topk"], b["topk"], strict=True))


def test_torchscript_export_and_synthetic_images_when_the_run_has_no_data(tmp_path):
    from transfer.deploy.export import export

    make_run(tmp_path / "run")  # config.yaml names no data root
    path, info = export(OmegaConf.create({**EXPORT_CFG, "ckpt": str(tmp_path / "run"), "format": "torchscript"}))
    assert path == tmp_path / "run" / "export" / "last.pt" and path.is_file()
    assert json.loads((tmp_path / "run" / "export" / "last.pt.json").read_text())["format"] == "torchscript"
    assert info["parity"]["passed"] and info["parity"]["images"] == 64 and "synthetic" in info["parity"]["source"]
    scripted = torch.jit.load(str(path))
    assert scripted(torch.randn(5, 3, 32, 32)).shape == (5, 3)  # the batch axis is not fixed by the trace


def _broken_copy(module: Classifier, shift: float) -> Classifier:
    """A copy whose head disagrees with ``module``: ``shift`` added to class 0's logit."""
    broken = copy.deepcopy(module)
    head = [m for m in broken.model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias[0] += shift
    return broken


@pytest.mark.parametrize("shift", [20.0, 0.01])
def test_parity_check_catches_a_broken_export(tmp_path, shift):
    """A large shift changes top-1 classes; a tiny one keeps them but moves probabilities past the tolerance."""
    from transfer.deploy.export import check_parity, export_model, load_exported, parity_batch

    module = Classifier.from_checkpoint(make_run(tmp_path / "run"))
    batch, source = parity_batch("synthetic", None, module.preprocess, 32)
    export_model(_broken_copy(module, shift), "onnx", tmp_path / "broken.onnx")
    parity = check_parity(module, load_exported(tmp_path / "broken.onnx", "onnx"), batch, 1e-4, source)
    assert not parity.passed and parity.max_abs_prob_diff > 1e-4
    if shift > 1:
        assert parity.top1_agree < parity.images
    export_model(module, "onnx", tmp_path / "good.onnx")
    assert check_parity(module, load_exported(tmp_path / "good.onnx", "onnx"), batch, 1e-4).passed


def test_a_failed_parity_check_is_an_error_and_leaves_no_model_behind(tmp_path, monkeypatch):
    import transfer.deploy.export as ex

    ckpt = make_run(tmp_path / "run")
    real_export = ex.export_model
    monkeypatch.setattr(ex, "export_model", lambda module, *a, **k: real_export(_broken_copy(module, 20.0), *a, **k))
    with pytest.raises(ex.ParityError, match="does not match the PyTorch model"):
        ex.export(OmegaConf.create({**EXPORT_CFG, "ckpt": str(ckpt)}))
    assert not list((tmp_path / "run" / "export").glob("last.*"))


def test_onnx_model_runs_any_batch_size_and_needs_its_json(tmp_path):
    from transfer.deploy.export import export
    from transfer.deploy.onnx_runtime import OnnxClassifier

    path, _ = export(
        OmegaConf.create({**EXPORT_CFG, "ckpt": str(make_run(tmp_path / "run")), "out": str(tmp_path / "x")})
    )
    model = OnnxClassifier(path)
    assert model.class_names == list(CLASSES) and model.preprocess.image_size == 32
    for n in (1, 7, 64):
        assert model(torch.randn(n, 3, 32, 32)).shape == (n, 3)
    Path(f"{path}.json").unlink()
    with pytest.raises(ConfigError, match="needs the JSON"):
        OnnxClassifier(path)


def test_unknown_format_is_a_config_error(tmp_path):
    from transfer.deploy.export import export

    with pytest.raises(ConfigError, match="format=tflite is not supported"):
        export(OmegaConf.create({**EXPORT_CFG, "ckpt": str(tmp_path), "format": "tflite"}))


def test_benchmark_row_compares_onnxruntime_with_eager_pytorch():
    import argparse

    from transfer.benchmarks.__main__ import ort_rows
    from transfer.benchmarks.measure import infer_ort

    measured = infer_ort(argparse.Namespace(repeats=1, seconds=0.05))
    assert all(measured[f"{k}_b{b}"] > 0 for k in ("ort", "eager") for b in (1, 64))
    fake = {
        "infer_ort": [{"ort_b1": 300.0, "eager_b1": 100.0, "ort_b64": 900.0, "eager_b64": 600.0, "peak_rss_mb": 500.0}]
    }
    rows = ort_rows(fake)
    assert [r[3] for r in rows] == ["3.00x", "1.50x"] and rows[1][1] == "900 (onnxruntime)"
    assert ort_rows({}) == []
