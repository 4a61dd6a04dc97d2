"""Using a trained model: predict from the checkpoint alone, evaluate on a data split, and agree."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.in_process import run_tool
from transfer.core.errors import ConfigError
from transfer.data.folders import collect_images
from transfer.deploy.load import find_checkpoint


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in this process (tests/in_process.py)."""
    return run_tool(module, *args)


def evaluate(run_dir: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    """``transfer.evaluate`` on a finished run's checkpoint and its tiny data."""
    data = [f"data.root={root}", "data.val_size=6", "data.num_workers=0", "data.download=false"]
    return cli("transfer.evaluate", f"ckpt={run_dir}", *data, *args)


def test_predict_then_evaluate_agree_on_the_test_split(finished_run, tmp_path: Path):
    run_dir, proc, _, root = finished_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = cli(
        "transfer.predict",
        f"ckpt={run_dir}",
        f"images={root / 'test'}",
        "topk=2",
        "grid=true",
        f"out={tmp_path / 'pred'}",
    )
    assert pred.returncode == 0, pred.stderr[-2000:]
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(r["true"] for r in results) == sorted(["cat", "dog", "ship"] * 4)  # 4 test images a class
    assert all(r["true"] == Path(r["image"]).parent.name for r in results)  # each labelled by its own folder
    assert all(len(r["topk"]) == 2 and r["topk"][0][1] >= r["topk"][1][1] for r in results)
    assert (tmp_path / "pred" / "predictions.csv").read_text().startswith("image,true,class1,prob1")
    assert (tmp_path / "pred" / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    predicted_acc = sum(r["label"] == r["true"] for r in results) / len(results)

    ev = evaluate(
        run_dir,
        root,
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["accuracy"] == pytest.approx(predicted_acc)
    # evaluate scores the checkpoint the run tested (its best, EMA weights, flip TTA as the run had it): same number
    assert metrics["accuracy"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())["test_acc"])
    # Same labels image by image, seen through the class-by-class counts: the two confusion matrices agree.
    classes = ["cat", "dog", "ship"]
    from_predict = [[sum(r["true"] == t and r["label"] == p for r in results) for p in classes] for t in classes]
    assert metrics["confusion"] == from_predict
    for name in ("confusion_matrix.png", "top_losses.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:4] == b"\x89PNG"
    assert f"{metrics['accuracy']:.4f}" in (tmp_path / "eval" / "report.md").read_text()


def _evaluate_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from transfer.conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("tools/evaluate", overrides=list(overrides))


def test_evaluate_val_split_is_the_runs_own_with_data_overrides_on_top(finished_run, tmp_path: Path):
    from omegaconf import OmegaConf

    from transfer.data import datamodule_from_config
    from transfer.deploy.evaluate import data_config
    from transfer.training.module import Classifier

    run_dir, proc, _, _ = finished_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = cli("transfer.evaluate", f"ckpt={run_dir}", "split=val", f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    run_data = OmegaConf.load(run_dir / "config.yaml").data
    assert run_data.val_size != _evaluate_config("ckpt=x").data.val_size  # the run's is not the default
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == run_data.val_size

    ckpt = find_checkpoint(run_dir)
    overrides = ["data.eval_batch_size=5"]
    node = data_config(_evaluate_config(f"ckpt={run_dir}", *overrides), ckpt, overrides)
    assert node.eval_batch_size == 5 and node.root == run_data.root and node.split_seed == run_data.split_seed
    pre = Classifier.from_checkpoint(ckpt).preprocess
    built = []
    for data in (node, run_data):
        dm = datamodule_from_config(data, pre, predict_split="val")
        dm.setup("predict")
        built.append(list(dm.val_set.indices))
    assert built[0] == built[1] and len(built[0]) == run_data.val_size


def test_evaluate_without_a_run_config_uses_the_composed_data_and_says_so(
    finished_run, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import logging
    import shutil

    from transfer.deploy.evaluate import data_config

    lone = tmp_path / "lone.ckpt"
    shutil.copy(find_checkpoint(finished_run[0]), lone)
    cfg = _evaluate_config(f"ckpt={lone}", "data.val_size=7")
    with caplog.at_level(logging.INFO, logger="transfer.deploy.evaluate"):
        node = data_config(cfg, lone, ["data.val_size=7"])
    assert node == cfg.data and node.val_size == 7
    assert "no run data config" in caplog.text


def test_checkpoint_and_image_lookup_errors_are_clear(tmp_path: Path):
    with pytest.raises(ConfigError, match="No checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="matches no image files"):
        collect_images(str(tmp_path / "*.jpg"))


def test_classification_metrics_on_a_known_case():
    import torch

    from transfer.deploy.evaluate import classification_metrics

    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(logits, targets, ["a", "b"])
    assert m["accuracy"] == 0.75 and m["confusion"] == [[2, 0], [1, 1]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 0.5


def test_classification_metrics_zero_division_and_macro_f1_over_every_class():
    """Worked by hand: c is predicted but never true, d is true but never predicted, e is neither."""
    import torch

    from transfer.deploy.evaluate import classification_metrics

    preds, targets = torch.tensor([0, 0, 0, 2, 1, 0]), torch.tensor([0, 0, 1, 1, 1, 3])
    m = classification_metrics(torch.nn.functional.one_hot(preds, 5).float(), targets, list("abcde"))
    assert m["confusion"] == [[2, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0] * 5, [1, 0, 0, 0, 0], [0] * 5]
    expected = {
        "a": (0.5, 1.0, 2 / 3, 2),
        "b": (1.0, 1 / 3, 0.5, 3),
        "c": (0.0, 0.0, 0.0, 0),
        "d": (0.0, 0.0, 0.0, 1),
        "e": (0.0, 0.0, 0.0, 0),
    }
    for name, (precision, recall, f1, support) in expected.items():
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision, recall, f1))
        assert got["support"] == support
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 5)  # e counts as 0, not skipped


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two photos of known ImageNet categories (scikit-image's offline samples), as JPEGs: a cat and an espresso."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpg", quality=90)
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg", quality=90)
    return folder


def test_model_name_predicts_imagenet_categories_with_the_pretrained_classifier(photos: Path, tmp_path: Path):
    proc = cli("transfer.predict", "model=efficientnet_lite0", f"images={photos}", "topk=3", f"out={tmp_path / 'p'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {Path(r["image"]).stem: r for r in json.loads((tmp_path / "p" / "predictions.json").read_text())}
    top3 = {stem: [name for name, _ in r["topk"]] for stem, r in results.items()}
    cats = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
    assert cats & set(top3["chelsea"]), top3
    assert {"espresso", "cup"} & set(top3["coffee"]), top3
    assert all(r["true"] is None for r in results.values())  # folder names are no ImageNet categories


def test_model_name_without_an_imagenet_head_is_refused_naming_ckpt(photos: Path, tmp_path: Path):
    proc = cli("transfer.predict", "model=lenet5", f"images={photos}", f"out={tmp_path / 'p'}")
    assert proc.returncode == 2 and "no ImageNet classifier" in proc.stderr and "ckpt=" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p").exists()


def test_model_name_whose_weights_cannot_load_offline_is_refused(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache; downloads fail in tests
    proc = cli("transfer.predict", "model=resnet18", f"images={photos}", f"out={tmp_path / 'p'}")
    assert proc.returncode == 2 and "could not be loaded" in proc.stderr and "ckpt=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_weights_without_the_classifier_are_refused_in_one_paragraph(tmp_path: Path):
    """A backbone-only file (as self-supervised checkpoints are) cannot predict ImageNet classes."""
    import torch

    from transfer.deploy.predict import pretrained_imagenet
    from transfer.models import architecture

    state = {k: v for k, v in architecture("efficientnet_lite0").build().state_dict().items() if "classifier" not in k}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(ConfigError, match=r"ImageNet classifier.*ckpt=") as err:
        pretrained_imagenet("efficientnet_lite0", str(tmp_path / "backbone.pth"))
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_a_transfer_checkpoint_is_refused(tmp_path: Path):
    import torch

    from transfer.training.module import Classifier

    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match=r"not a checkpoint written by transfer\.run"):
        Classifier.from_checkpoint(tmp_path / "other.ckpt")


def test_evaluate_refuses_an_unknown_precision_in_one_paragraph(finished_run, tmp_path: Path):
    run_dir, _, _, root = finished_run
    ev = evaluate(
        run_dir,
        root,
        "precision=nonsense",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert ev.returncode == 2 and "precision=nonsense cannot be used" in ev.stderr and "Traceback" not in ev.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_evaluate_scores_the_live_weights_beside_their_ema_on_request(finished_run, tmp_path: Path):
    import torch

    from transfer.training.module import Classifier

    run_dir, _, _, root = finished_run
    ckpt = find_checkpoint(run_dir)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    ema, live = Classifier.from_checkpoint(ckpt).state_dict(), Classifier.from_checkpoint(ckpt, live=True).state_dict()
    key = next(k for k in saved["current_model_state"] if k.startswith("model.head") and k.endswith("weight"))
    assert torch.equal(live[key], saved["current_model_state"][key]) and torch.equal(ema[key], saved["state_dict"][key])
    assert not torch.equal(live[key], ema[key])  # the run averaged: two different sets of weights
    ev = evaluate(run_dir, root, "weights=live", f"hydra.run.dir={tmp_path / 'live'}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["weights"] == "live"
    assert "with the live weights" in (tmp_path / "live" / "report.md").read_text()
    assert evaluate(run_dir, root, f"hydra.run.dir={tmp_path / 'ema'}").returncode == 0
    assert json.loads((tmp_path / "ema" / "metrics.json").read_text())["weights"] == "ema"
    bad = evaluate(run_dir, root, "weights=best", f"hydra.run.dir={tmp_path / 'bad'}")
    said = " ".join(bad.stderr.split())
    assert bad.returncode == 2 and "weights='best' must be ema" in said and "Traceback" not in said
    assert not (tmp_path / "bad" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{d}/000[0-3].png", ["0000.png", "0001.png", "0002.png", "0003.png"]),
        ("{d}/0001.png,{d}/0004.png", ["0001.png", "0004.png"]),
        ("[{d}/0002.png,{d}/0005.png]", ["0002.png", "0005.png"]),
    ],
)
def test_images_takes_a_pattern_a_comma_list_or_a_list(tmp_path: Path, spec: str, expected: list[str]):
    import numpy as np
    from PIL import Image

    from tests.deploy.test_untrusted_inputs import tiny_checkpoint

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i:04d}.png")
    ckpt = tiny_checkpoint(tmp_path / "c.ckpt")
    proc = cli("transfer.predict", f"ckpt={ckpt}", f"images={spec.format(d=folder)}", f"out={tmp_path / 'p'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in results] == expected
