"""What makes one training step of a model faster on this machine: its speed levers, timed side by side.

    python -m transfer.benchmarks.step_levers                        # Lite0 at 80 px, batch 64, 4 frozen layers
    python -m transfer.benchmarks.step_levers --size 64 --batches 32 64 128 --compile

One process builds the model once per variant and times the variants interleaved (every repeat runs each in turn,
so a slow minute of a shared machine hits all of them) and prints medians. The images are random tensors: what is
timed is the model's forward and backward and the optimizer's step on this device, not the data path
(``python -m transfer.benchmarks.measure augment_ours`` times that). The variants, each against ``fused``:

- ``loop``: AdamW stepping its tensors one by one (torch's default off a GPU; on a GPU its default is the
  ``foreach`` kernel, which this does not time);
- ``fused``: AdamW's fused kernel, what ``conf/optimizer/adamw.yaml`` sets;
- ``bf16``: ``fused`` under bf16 autocast (``trainer.precision=bf16-mixed``);
- ``compiled``: ``fused`` with the forward compiled (``compute.compile=true``; with ``--compile``, its compile time
  printed apart);
- ``batch N``: ``fused`` at the other ``--batches``, compared in images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transfer.models import create_model
from transfer.training.compute import configure_threads

Step = Callable[[], None]


def _step(model: nn.Module, batch: int, size: int, fused: bool, bf16: bool = False) -> Step:
    """One optimizer step of ``model`` on a fixed random batch, as a closure."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=fused, foreach=None if fused else False)
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def variants(args: argparse.Namespace) -> tuple[dict[str, tuple[Step, int]], float | None]:
    """Every variant's step and batch size, and the seconds the compiled one took to compile (``None`` without)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = create_model(args.model, 10, pretrained=False, adapt="resize", frozen_layers=args.frozen_layers)
        return net.to(device).train().to(memory_format=torch.channels_last)

    base = model()
    steps = {
        "loop": (_step(base, args.batch, args.size, fused=False), args.batch),
        "fused": (_step(base, args.batch, args.size, fused=True), args.batch),
        "bf16": (_step(base, args.batch, args.size, fused=True, bf16=True), args.batch),
    }
    steps |= {f"batch {b}": (_step(base, b, args.size, fused=True), b) for b in args.batches if b != args.batch}
    compile_s = None
    if args.compile:
        compiled = model()
        compiled.compile()
        steps["compiled"] = (_step(compiled, args.batch, args.size, fused=True), args.batch)
        start = time.perf_counter()
        steps["compiled"][0]()
        compile_s = time.perf_counter() - start
    return steps, compile_s


def measure(args: argparse.Namespace) -> list[dict[str, float | str]]:
    """Median seconds per step and images/s of each variant, interleaved over ``args.repeats``."""
    configure_threads(args.threads)
    steps, compile_s = variants(args)
    for step, _ in steps.values():  # warm-up: allocator, oneDNN primitives, autotuning
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds[name].append((time.perf_counter() - start) / args.steps)
    rate = {name: steps[name][1] / statistics.median(s) for name, s in seconds.items()}
    rows: list[dict[str, float | str]] = [
        {
            "variant": name,
            "seconds_per_step": round(statistics.median(seconds[name]), 6),
            "images_per_s": round(rate[name], 1),
            "vs_fused": round(rate[name] / rate["fused"], 3),
        }
        for name in steps
    ]
    if compile_s is not None:
        rows.append({"variant": "compile time", "seconds": round(compile_s, 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print one JSON line per variant."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=80, help="input side in px (the budget recipe's CIFAR-10 size)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="*", default=[32, 128], help="other batch sizes to compare")
    ap.add_argument("--frozen-layers", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="add the compiled variant (minutes on a CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per repeat")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per available core)")
    for row in measure(ap.parse_args(argv)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
