"""Bounded local load test of ``transfer.serve``: requests/s and p50/p99 latency, without and with batching.

    python -m transfer.benchmarks.serve_load [--ckpt PATH] [--requests 300] [--concurrency 16]
        [--max-batch-size 16] [--batch-timeout 0.01] [--image FILE]

Starts the server on 127.0.0.1 twice (``max_batch_size=1``, then ``--max-batch-size``), sends the same
``--requests`` multipart uploads from ``--concurrency`` client threads to each (after a warm-up), and stops it.
Nothing leaves the machine; every request has a 30 s timeout and each configuration stops sending after
``--max-seconds``. Without ``--ckpt`` an untrained EfficientNet-Lite0 at 32 px (the compute of a CIFAR-10 run) is
checkpointed in a temporary folder. The image defaults to the first CIFAR-10 test JPEG found under
``$TRANSFER_DATA`` (else a synthetic PNG). Results also go to ``outputs/benchmarks/serve_<time>.{md,json}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, overrides: list[str], log: Path, wait_s: float = 240) -> subprocess.Popen:
    """``python -m transfer.serve`` in its own process group; returns once ``GET /health`` answers 200."""
    import httpx

    with open(log, "w") as out:  # the child keeps its own copy of the file descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "transfer.serve", f"ckpt={ckpt}", f"port={port}", *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not healthy after {wait_s:.0f} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """End the server's process group (the server and the LitServe workers it started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def demo_checkpoint(folder: Path, model: str = "efficientnet_lite0") -> Path:
    """An untrained ``model`` (32 px, 10 classes) saved as a transfer checkpoint after one training step."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from transfer.data.cifar import CIFAR10_CLASSES
    from transfer.models import model_preprocess
    from transfer.training.module import Classifier

    module = Classifier(
        {"name": model, "pretrained": False},
        list(CIFAR10_CLASSES),
        {"_target_": "torch.optim.Adam"},
        preprocess=model_preprocess(model, "native", None, 32).to_dict(),
    )
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(folder / "checkpoints" / "last.ckpt")
    return folder / "checkpoints" / "last.ckpt"


def sample_image(path: Path | None) -> tuple[bytes, str]:
    """The bytes of the image every request sends, and its name."""
    if path is None:
        data = Path(os.environ.get("TRANSFER_DATA", Path.home() / ".cache" / "transfer-data" / "cifar10")).expanduser()
        path = next(iter(sorted((data / "test").glob("*/*.jpg"))[:1]), None) if (data / "test").is_dir() else None
    if path is not None:
        return Path(path).read_bytes(), str(path)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue(), "synthetic 32 px PNG"


def load(url: str, image: bytes, requests: int, concurrency: int, max_seconds: float) -> dict[str, Any]:
    """Send ``requests`` uploads from ``concurrency`` threads; latencies (ms) of the successful ones."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    remaining = [requests]
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                try:
                    ok = http.post(url, files={"image": ("img", image, "image/jpeg")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append((time.perf_counter() - start) * 1000) if ok else None
                    errors[0] += 0 if ok else 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    pct = np.percentile(latencies, [50, 99]) if latencies else [float("nan")] * 2
    return {
        "requests_ok": len(latencies),
        "errors": errors[0],
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
        "p50_ms": float(pct[0]),
        "p99_ms": float(pct[1]),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
    }


def measure(ckpt: Path, batch: int, args: argparse.Namespace, image: bytes, log: Path) -> dict[str, Any]:
    """One server configuration: start, warm up, load, stop."""
    port = free_port()
    proc = start_server(ckpt, port, [f"max_batch_size={batch}", f"batch_timeout={args.batch_timeout}"], log)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        load(url, image, args.warmup, min(args.concurrency, args.warmup), args.max_seconds)
        result = load(url, image, args.requests, args.concurrency, args.max_seconds)
    finally:
        stop_server(proc)
    return {"max_batch_size": batch, "batch_timeout": args.batch_timeout if batch > 1 else 0.0, **result}


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The results as a Markdown table."""
    lines = [
        header,
        "",
        "| max_batch_size | batch_timeout s | req/s | p50 ms | p99 ms | ok | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['max_batch_size']} | {r['batch_timeout']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | "
        f"{r['p99_ms']:.1f} | {r['requests_ok']} | {r['errors']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint, run dir or .onnx (default: untrained Lite0)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--image", type=Path, default=None)
    args = ap.parse_args(argv)
    image, image_name = sample_image(args.image)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or demo_checkpoint(Path(tmp) / "run")
        rows = [measure(ckpt, b, args, image, Path(tmp) / f"server_{b}.log") for b in (1, args.max_batch_size)]
    header = (
        f"transfer.serve load test: {args.requests} requests from {args.concurrency} client threads, "
        f"model {args.ckpt or 'untrained efficientnet_lite0 32 px'}, image {image_name}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs."
    )
    text = markdown(rows, header)
    print(text)
    print(json.dumps({"serve_load": rows}))
    out = Path.cwd() / "outputs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("serve_%Y-%m-%d_%H-%M-%S")
    (out / f"{stamp}.md").write_text(text + "\n")
    (out / f"{stamp}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
