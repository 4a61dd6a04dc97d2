"""Every file handed to predict is input: checkpoints, export descriptions, images and the names they carry."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_image_folder
from tests.in_process import run_tool
from transfer.core.errors import ConfigError
from transfer.models import model_preprocess
from transfer.training.module import Classifier

CLASSES = ["cat", "dog", "ship"]
HOSTILE = "=cmd|' /C calc'!A0"


def tiny_checkpoint(path: Path, classes: list[str] = CLASSES, edit: Any = None) -> Path:
    """A checkpoint as a run writes it (hyper-parameters, state dict, ``transfer`` entry) of an untrained lenet5,
    made without a Trainer; ``edit(ckpt)`` alters it before it is saved."""
    pre = model_preprocess("lenet5", "native", None, 32).to_dict()
    module = Classifier({"name": "lenet5", "pretrained": False}, list(classes), {"_target_": "torch.optim.SGD"}, None,
                        preprocess=pre)  # fmt: skip
    ckpt: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    if edit is not None:
        edit(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def predict_cli(ckpt: Path, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_tool("transfer.predict", f"ckpt={ckpt}", f"images={images}", f"out={out}", "device=cpu", *extra)


def _set(entry: str, key: str, value: Any) -> Any:
    def edit(ckpt: dict[str, Any]) -> None:
        target = ckpt[entry] if entry == "hyper_parameters" else ckpt["transfer"]
        for part in key.split(".")[:-1]:
            target = target[part]
        target[key.split(".")[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("entry", "key", "value", "field"),
    [
        ("hyper_parameters", "preprocess.image_size", 60000, "hyper_parameters.preprocess.image_size"),
        ("transfer", "preprocess.image_size", 60000, "transfer.preprocess.image_size"),
        ("hyper_parameters", "preprocess.std", [0.2, 0.0, 0.2], "hyper_parameters.preprocess.std"),
        ("hyper_parameters", "preprocess.mean", [0.5, float("nan"), 0.5], "hyper_parameters.preprocess.mean"),
        ("hyper_parameters", "preprocess.interpolation", "exec", "hyper_parameters.preprocess.interpolation"),
        ("hyper_parameters", "preprocess.crop_pct", 1.5, "hyper_parameters.preprocess.crop_pct"),
        ("hyper_parameters", "class_names", ["only"], "hyper_parameters.class_names"),
        ("hyper_parameters", "class_names", ["a", "a", "b"], "hyper_parameters.class_names"),
        ("hyper_parameters", "class_names", ["a", 3, "b"], "hyper_parameters.class_names[1]"),
        ("hyper_parameters", "class_names", ["a", "x" * 300], "hyper_parameters.class_names[1]"),
        ("transfer", "class_names", list(range(3)), "transfer.class_names[0]"),
        ("hyper_parameters", "model.name", "no_such_net", "hyper_parameters.model.name"),
        ("hyper_parameters", "_instantiator", "lightning.pytorch.cli.instantiate_module", "hyper_parameters"),
        ("hyper_parameters", "surprise", 1, "hyper_parameters"),
    ],
)
def test_checkpoint_metadata_out_of_bounds_is_refused_before_building(tmp_path: Path, entry, key, value, field):
    ckpt = tiny_checkpoint(tmp_path / "bad.ckpt", edit=_set(entry, key, value))
    with pytest.raises(ConfigError) as err:
        Classifier.from_checkpoint(ckpt)
    message = str(err.value)
    assert str(ckpt) in message and field in message and "\n" not in message


def test_predict_with_a_huge_declared_input_exits_2_in_one_paragraph(tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path / "huge.ckpt", edit=_set("hyper_parameters", "preprocess.image_size", 60000))
    images = make_image_folder(tmp_path / "img", {"x": 1})
    before = ckpt.read_bytes()
    proc = predict_cli(ckpt, images, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hyper_parameters.preprocess.image_size = 60000 is not an input size" in " ".join(proc.stderr.split())
    assert not (tmp_path / "out").exists() and ckpt.read_bytes() == before


def test_a_good_checkpoint_still_loads_and_predicts(tmp_path: Path):
    module = Classifier.from_checkpoint(tiny_checkpoint(tmp_path / "ok.ckpt"))
    assert module.class_names == CLASSES and module.preprocess is not None and not module.training


def test_onnx_sidecar_out_of_bounds_is_refused(tmp_path: Path):
    from transfer.deploy.onnx_runtime import OnnxClassifier

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the sidecar is checked first")
    pre = model_preprocess("lenet5", "native", None, 32).to_dict()
    for change, field in (({"image_size": 60000}, "preprocess.image_size"), ({"std": [1, 1, -1]}, "preprocess.std")):
        (tmp_path / "m.onnx.json").write_text(json.dumps({"class_names": CLASSES, "preprocess": {**pre, **change}}))
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            OnnxClassifier(model)
        assert "m.onnx.json" in str(err.value)
    (tmp_path / "m.onnx.json").write_text(json.dumps({"class_names": [HOSTILE], "preprocess": pre}))
    with pytest.raises(ConfigError, match="class_names holds 1 names"):
        OnnxClassifier(model)
    (tmp_path / "m.onnx.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        OnnxClassifier(model)


def test_hostile_class_names_are_escaped_in_predictions_csv(tmp_path: Path):
    names = [HOSTILE, "+1", "@SUM(A1)"]
    ckpt = tiny_checkpoint(tmp_path / "c.ckpt", classes=names)
    images = make_image_folder(tmp_path / "img", {"x": 1}, classes=["-2"])  # a hostile folder name, as "true"
    proc = predict_cli(ckpt, images, tmp_path / "out", "topk=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.reader((tmp_path / "out" / "predictions.csv").read_text().splitlines()))
    cells = [c for row in rows[1:] for c in row]
    assert {"'" + n for n in names} <= set(cells) and not set(names) & set(cells)
    assert all(not c.startswith(("=", "+", "-", "@")) for c in cells)
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {c for r in results for c, _ in r["topk"]} == set(names)  # the JSON keeps the names as they are


@pytest.fixture
def mixed_images(tmp_path: Path) -> Path:
    """Three good PNGs, a truncated JPEG and a PNG whose header declares 9000 x 9000 pixels (81 MP)."""
    folder = make_image_folder(tmp_path / "mixed", {"x": 3}, classes=["cat"]) / "x" / "cat"
    full = folder / "full.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(full, quality=90)
    (folder / "truncated.jpg").write_bytes(full.read_bytes()[:200])
    full.unlink()
    (folder / "huge.png").write_bytes(png_header(9000, 9000))
    return folder


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` 8-bit greyscale pixels and holds none: only its header is read."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def test_bad_images_do_not_stop_the_good_ones_and_exit_2(tmp_path: Path, mixed_images: Path):
    ckpt = tiny_checkpoint(tmp_path / "c.ckpt")
    proc = predict_cli(ckpt, mixed_images, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = " ".join(proc.stderr.split())  # the paragraph is wrapped for the terminal
    assert "2 of 5 image(s) could not be read" in message and "truncated.jpg (" in message
    assert "huge.png (TooManyPixelsError: 9000x9000 is 81 MP, over the 50 MP cap)" in message
    results = {Path(r["image"]).name: r for r in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    assert sorted(n for n, r in results.items() if r["error"] is None and r["label"] in CLASSES) == [
        "000.png",
        "001.png",
        "002.png",
    ]
    assert results["huge.png"]["error"].startswith("TooManyPixelsError") and results["huge.png"]["topk"] == []
    written = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    rows = {Path(r["image"]).name: r for r in csv.DictReader(written)}
    assert rows["truncated.jpg"]["error"] and rows["truncated.jpg"]["class1"] == "" and not rows["000.png"]["error"]
    assert "not read:" in proc.stdout and "3 of 5 images predicted" in proc.stdout


def test_skip_corrupt_exits_0_and_the_cap_is_a_setting(tmp_path: Path, mixed_images: Path):
    ckpt = tiny_checkpoint(tmp_path / "c.ckpt")
    proc = predict_cli(ckpt, mixed_images, tmp_path / "out", "skip_corrupt=true", "max_megapixels=500")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {Path(r["image"]).name: r for r in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    assert results["truncated.jpg"]["error"] and not results["huge.png"]["error"].startswith("TooManyPixels")


def test_an_output_folder_through_a_file_is_one_paragraph(tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path / "c.ckpt")
    images = make_image_folder(tmp_path / "img", {"x": 1})
    (tmp_path / "afile").write_text("x")
    proc = predict_cli(ckpt, images, tmp_path / "afile" / "out")
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot be written into out={tmp_path / 'afile' / 'out'}" in message and "Not a directory" in message
    assert (tmp_path / "afile").read_text() == "x"
