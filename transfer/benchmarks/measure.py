"""One benchmark measurement per process, printed as a JSON line (peak memory is then the process's own).

    python -m transfer.benchmarks.measure augment_ours --data DIR
    python -m transfer.benchmarks.measure augment_seed --data DIR --seed-loop PATH/seed_loop.py
    python -m transfer.benchmarks.measure train_lightning --data DIR [--precision bf16-mixed]
    python -m transfer.benchmarks.measure train_raw --data DIR
    python -m transfer.benchmarks.measure train_lightning --data DIR --recipe [--size 80] [--batch-size 64]
    python -m transfer.benchmarks.measure peak_matmul --data DIR [--precision bf16-mixed]
    python -m transfer.benchmarks.measure frozen_epoch --data DIR --cached
    python -m transfer.benchmarks.measure infer_ort --data DIR [--repeats 5] [--seconds 1]
    python -m transfer.benchmarks.measure eval_folded --data DIR [--repeats 5]

``python -m transfer.benchmarks`` runs them side by side with the seed loop and prints the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transfer.benchmarks.flops import peak_matmul_flops, training_flops_per_image
from transfer.benchmarks.timeline import accuracy
from transfer.data import CIFAR10Data
from transfer.models import model_preprocess
from transfer.training.compute import apply_compute
from transfer.training.module import Classifier
from transfer.training.optim import build_optimizer

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 1e-4}  # the seed's optimizer
# The seed's model: torchvision ResNet-18 unchanged (7x7/s2 stem) with a new 10-way fc, fed 32 px.
SEED_RESNET18 = {"name": "resnet18", "pretrained": False, "adapt": "resize"}
# ``--recipe``: the default recipe's step (conf/ defaults; 80 px is what budget= feeds it on a CPU from 4 minutes):
# Lite0 with its packaged ImageNet weights and its lowest 4 layers frozen, fused AdamW, label smoothing 0.1 and,
# on the framework's side, the EMA and divergence guard a default run adds to every step.
RECIPE = {"name": "efficientnet_lite0", "pretrained": True, "adapt": "resize", "frozen_layers": 4}
ADAMW = {"_target_": "torch.optim.AdamW", "lr": 2e-3, "weight_decay": 1e-4, "fused": True}


def _data(root: str, model: dict[str, Any], batch_size: int = 64, size: int = 32, **kwargs: Any) -> CIFAR10Data:
    """CIFAR-10 fed at ``size`` px, with ``model``'s normalisation."""
    preprocess = model_preprocess(model["name"], model.get("adapt", "native"), size, CIFAR10Data.native_size)
    return CIFAR10Data(root, download=False, batch_size=batch_size, num_workers=0, preprocess=preprocess, **kwargs)


def _rate(fn: Any, repeats: int) -> float:
    """Median over ``repeats`` of the rate ``fn`` returns."""
    return statistics.median(fn() for _ in range(repeats))


def augment_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Batches/s of model-ready augmented batches: in-memory uint8 loader + batched augmentation."""
    dm = _data(args.data, SEED_RESNET18)
    dm.setup("fit")
    loader = dm.train_dataloader()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where training would augment

    def once() -> float:
        it, start = iter(loader), time.perf_counter()
        for _ in range(args.batches):
            dm.prepare_batch(tuple(t.to(device, non_blocking=True) for t in next(it)), train=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batches / (time.perf_counter() - start)

    once()  # warm-up
    return {"batches_per_s": _rate(once, args.repeats)}


def _seed_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("seed_loop", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the seed loop from {path}: pass --seed-loop")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def augment_seed(args: argparse.Namespace) -> dict[str, Any]:
    """Batches/s of the seed's data path: its in-memory dataset, per-image PIL transforms, num_workers=0."""
    from torchvision import transforms

    seed = _seed_module(args.seed_loop)
    tf = transforms.Compose(
        [  # seed_loop.py's train transform, verbatim
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
            transforms.RandomRotation(15),
            transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        ]
    )
    ds = seed.InMemoryImages(Path(args.data) / "train", tf, 10000)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=0, drop_last=True)

    def once() -> float:
        it, start = iter(loader), time.perf_counter()
        for _ in range(args.batches // 4):  # ~25x slower: fewer batches give the same timing precision
            next(it)
        return args.batches // 4 / (time.perf_counter() - start)

    return {"batches_per_s": _rate(once, args.repeats)}


class StepTimer(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of step ``last`` (data loading included); a GPU is
    synchronised at those two steps only, as the raw loop is."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last, self.start, self.end, self.images = warmup, last, 0.0, 0.0, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            if trainer.global_step == self.last:
                _sync(pl_module.device)
            self.end = time.perf_counter()
            self.images += len(batch[1])


def _train_parts(args: argparse.Namespace) -> tuple[CIFAR10Data, Classifier]:
    L.seed_everything(0)
    model, optimizer, smoothing = (RECIPE, ADAMW, 0.1) if args.recipe else (SEED_RESNET18, ADAM, 0.0)
    dm = _data(args.data, model, args.batch_size, args.size if args.recipe else 32, val_size=0.1)
    module = Classifier(model, dm.classes, optimizer, label_smoothing=smoothing, preprocess=dm.hparams["preprocess"])
    apply_compute(module.model, channels_last=True)
    return dm, module


def train_lightning(args: argparse.Namespace) -> dict[str, Any]:
    """Training images/s through ``Trainer.fit`` with this project's module and data path (no validation)."""
    from transfer.training.ema import EMA
    from transfer.training.guard import DivergenceGuard
    from transfer.training.history import History

    dm, module = _train_parts(args)
    timer = StepTimer(args.warmup, args.warmup + args.steps)
    recipe = [EMA(decay=0.998, warmup=10), DivergenceGuard()] if args.recipe else []
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=20,
        callbacks=[timer, History(), *recipe],
    )
    trainer.fit(module, datamodule=dm)
    model = module.model.train()
    side = dm.hparams["preprocess"]["image_size"]
    images = torch.randn(2, 3, side, side, device=module.device).contiguous(memory_format=torch.channels_last)
    return {
        "images_per_s": timer.images / (timer.end - timer.start),
        "precision": args.precision,
        "flops_per_image": training_flops_per_image(model, images),
    }


def train_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The same model, data path, optimizer and precision in a plain loop: the Lightning overhead's reference."""
    dm, module = _train_parts(args)
    dm.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = module.model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(module.hparams["optimizer"], [{"params": trainable}])  # the Lightning side's settings
    smoothing = module.hparams["label_smoothing"]
    bf16 = args.precision.startswith("bf16")
    it, images, start = iter(dm.train_dataloader()), 0, 0.0
    for step in range(args.warmup + args.steps):
        x, y, _ = dm.prepare_batch(tuple(t.to(device) for t in next(it)), train=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 == args.warmup:
            _sync(device)
            start = time.perf_counter()
        elif step + 1 > args.warmup:
            images += len(y)
    _sync(device)
    return {"images_per_s": images / (time.perf_counter() - start), "precision": args.precision}


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads what the GPU did and not what it was sent."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul(args: argparse.Namespace) -> dict[str, Any]:
    """The device's measured matrix-product peak in the training precision (``--precision``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    return {"flops_per_s": peak_matmul_flops(device, dtype), "precision": args.precision}


def frozen_epoch(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per frozen-backbone epoch (EfficientNet-Lite0, packaged ImageNet weights) on ``--images``
    training images, with or without the feature cache; the cache's one-time extraction reported apart."""
    from transfer.training.features import CachedFeatureData, FeatureCache
    from transfer.training.finetune import StagedFinetuning

    L.seed_everything(0)
    lite0 = {"name": "efficientnet_lite0", "pretrained": True}
    dm = _data(args.data, lite0)
    module = Classifier(lite0, dm.classes, ADAM, preprocess=dm.hparams["preprocess"])
    apply_compute(module.model, channels_last=True)
    dm.setup("fit")
    train_set = dm.train_set
    assert train_set is not None  # setup("fit") made it
    keep = train_set.indices  # sorted by class: take a random subset, not the first classes
    train_set.indices = keep[np.random.default_rng(0).permutation(len(keep))[: args.images]]
    epochs = EpochTimer()
    callbacks: list[L.Callback] = [StagedFinetuning(unfreeze_at_epoch=None, bn=args.bn), epochs]
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=args.epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        reload_dataloaders_every_n_epochs=1 if args.cached else 0,
    )
    data = CachedFeatureData(dm, FeatureCache(None, root=args.cache)) if args.cached else dm
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {
        "epoch_s": statistics.median(epochs.seconds),
        "setup_s": epochs.first_start - start,
        "images": args.images,
        "cached": args.cached,
        "bn": args.bn,
        "val_acc": accuracy(module, dm, dm._loader(dm.val_set, train=False)),
    }  # images, not cached features


class EpochTimer(L.Callback):
    """Seconds of each training epoch, and when the first one started."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.first_start, self._start = 0.0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self.first_start = self.first_start or self._start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _timed_rate(fn: Any, batch: int, seconds: float) -> float:
    """Images/s of ``fn`` (one batch per call) over at least ``seconds``, after two warm-up calls."""
    fn()
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls * batch / elapsed


def infer_ort(args: argparse.Namespace) -> dict[str, Any]:
    """Inference images/s of EfficientNet-Lite0 at 32 px (a CIFAR-10 run's model): eager PyTorch (fp32, as
    ``transfer.predict`` runs it) against onnxruntime on the exported network, batch 1 and 64, the same threads;
    the two alternate ``args.repeats`` times and the medians are reported."""
    import tempfile

    from transfer.deploy.export import export_model
    from transfer.deploy.onnx_runtime import ort_session

    preprocess = model_preprocess("efficientnet_lite0", "native", None, 32).to_dict()
    module = Classifier(
        {"name": "efficientnet_lite0", "pretrained": False}, [str(i) for i in range(10)], ADAM, preprocess=preprocess
    )
    net, threads = module.model.eval(), torch.get_num_threads()
    result: dict[str, Any] = {"threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(module, "onnx", Path(tmp) / "lite0.onnx")
        session = ort_session(Path(tmp) / "lite0.onnx", threads)
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32)
            feed = {"input": x.numpy()}
            rates: dict[str, list[float]] = {"eager": [], "ort": []}
            for _ in range(args.repeats):
                with torch.inference_mode():
                    rates["eager"].append(_timed_rate(lambda x=x: net(x), batch, args.seconds))
                rates["ort"].append(_timed_rate(lambda feed=feed: session.run(None, feed), batch, args.seconds))
            for name, values in rates.items():
                result[f"{name}_b{batch}"] = statistics.median(values)
    return result


def eval_folded(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per eval batch (256, 64 px, channels-last) of Lite0 as it is and with its BatchNorms folded,
    interleaved, medians of ``--repeats``; and the largest logit difference."""
    from transfer.models import create_model
    from transfer.models.fold import fold_batchnorm

    torch.manual_seed(0)
    net = create_model(name="efficientnet_lite0", num_classes=10, adapt="resize").to(memory_format=torch.channels_last)
    x = torch.randn(256, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    folded, net = fold_batchnorm(net, x[:2]), net.eval()
    times: dict[str, list[float]] = {"plain": [], "folded": []}
    with torch.inference_mode():
        diff = (folded(x) - net(x)).abs().max().item()  # also the warm-up pass of each
        for _ in range(args.repeats):
            for name, model in (("plain", net), ("folded", folded)):
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    plain, fast = statistics.median(times["plain"]), statistics.median(times["folded"])
    return {"plain_s": plain, "folded_s": fast, "ratio": fast / plain, "max_logit_diff": diff}


MEASURES = {
    f.__name__: f
    for f in (
        augment_ours,
        augment_seed,
        train_lightning,
        train_raw,
        peak_matmul,
        frozen_epoch,
        infer_ort,
        eval_folded,
    )
}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: run one measurement, print one JSON line with its peak resident memory."""
    import resource

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measure", choices=sorted(MEASURES))
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed-loop", default=None, help="augment_seed: the seed loop script (its InMemoryImages)")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--recipe", action="store_true", help="train_*: the default recipe's step, not the seed's")
    ap.add_argument("--size", type=int, default=80, help="train_* --recipe: the input side in px")
    ap.add_argument("--batch-size", type=int, default=64, help="train_*: images per step")
    ap.add_argument("--images", type=int, default=6400)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cached", action="store_true")
    ap.add_argument("--bn", default="train", choices=["train", "frozen"])
    ap.add_argument("--cache", default=None, help="feature cache folder (a fresh one measures the extraction)")
    ap.add_argument("--seconds", type=float, default=1.0, help="infer_ort: seconds per timing")
    args = ap.parse_args(argv)
    if args.measure == "augment_seed" and not args.seed_loop:
        ap.error("augment_seed needs --seed-loop PATH, the seed loop script whose InMemoryImages it times")
    result = MEASURES[args.measure](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"measure": args.measure, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}}
        )
    )


if __name__ == "__main__":
    main()
