"""Bounded local load test of ``transfer.serve``: requests/s and p50/p99 latency, without and with batching, or
under abuse.

    python -m transfer.benchmarks.serve_load [--ckpt PATH] [--requests 300] [--concurrency 16]
        [--max-batch-size 16] [--batch-timeout 0.01] [--image FILE]
    python -m transfer.benchmarks.serve_load --scenario mixed [--seconds 20] [--huge 3] [--slow 150]

``--scenario mixed`` serves good uploads (at most ``--requests`` per client) beside 6000x6000 PNGs (~100 kB,
under the pixel cap), ``--slow`` clients trickling their headers and malformed bodies, polls ``/health`` every
50 ms, and reports p50/p99 of the good requests and of ``/health``, the other requests' statuses and how many
slow clients the server cut off; everything stops after ``--seconds``.

Starts the server on 127.0.0.1 twice (``max_batch_size=1``, then ``--max-batch-size``), sends the same
``--requests`` multipart uploads from ``--concurrency`` client threads to each (after a warm-up), and stops it.
Nothing leaves the machine; every request has a 30 s timeout and each configuration stops sending after
``--max-seconds``. Without ``--ckpt`` an untrained EfficientNet-Lite0 at 32 px (the compute of a CIFAR-10 run) is
checkpointed in a temporary folder. The image defaults to the first CIFAR-10 test JPEG found under
``$TRANSFER_DATA`` (else a synthetic PNG). Results also go to ``outputs/benchmarks/serve_<time>.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections import Counter
from collections.abc import Callable
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


def group_alive(pgid: int) -> list[int]:
    """pids of the processes still in process group ``pgid`` (zombies excluded)."""
    try:
        import psutil
    except ImportError:  # /proc gives the same on Linux
        psutil = None
    alive = []
    if psutil is not None:
        for p in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                    alive.append(p.pid)
        return alive
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if fields[0] != "Z" and int(fields[2]) == pgid:
                alive.append(int(stat.parent.name))
    return alive


def stop_server(proc: subprocess.Popen, wait_s: float = 20) -> None:
    """SIGTERM the server, as a service manager would, and wait for it; whatever of its process group (the
    LitServe workers it started) is left after ``wait_s`` is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
    if group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
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
        {"_target_": "torch.optim.Adam", "lr": 1e-3},
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


def huge_png(side: int = 6000) -> bytes:
    """A ``side`` x ``side`` PNG that compresses to ~100 kB: cheap to send, expensive to decode."""
    from PIL import Image

    tile = np.random.default_rng(1).integers(0, 256, (1, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(tile, side, axis=0)).save(buf, "PNG")
    return buf.getvalue()


MALFORMED = [  # (body, content type): each must be a 4xx, never a 500
    (b"[" * 200_000, "application/json"),
    (b'{"image": ' * 50_000, "application/json"),
    (b'{"image": "%%%"}', "application/json"),
    (b"\xff\xfe garbage", "application/json"),
    (b"--x\r\nContent-Disposition: form-data\r\n\r\n", "multipart/form-data; boundary=x"),
]


def _percentiles(values: list[float]) -> dict[str, float]:
    pct = np.percentile(values, [50, 99]) if values else [float("nan")] * 2
    return {"n": len(values), "p50_ms": float(pct[0]), "p99_ms": float(pct[1]), "max_ms": max(values, default=0.0)}


def _repeat(stop_at: float, count: int, one: Callable[[], None]) -> None:
    for _ in range(count):
        if time.monotonic() >= stop_at:
            return
        one()


def _slow_client(port: int, stop_at: float, closed_after: list[float]) -> None:
    """Open a connection and trickle a request's headers, one byte a second, until the server closes it."""
    start = time.monotonic()
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        for byte in b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
            if time.monotonic() >= stop_at:
                return
            sock.send(bytes([byte]))
            with contextlib.suppress(TimeoutError, socket.timeout):
                sock.settimeout(1.0)
                if sock.recv(1024) == b"":  # closed by the server
                    break
    closed_after.append(time.monotonic() - start)


def mixed_load(port: int, image: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """Good uploads beside huge-but-allowed images, slow clients and malformed bodies, all for at most
    ``args.seconds``; latencies of the good requests and of ``GET /health``, and what the others got."""
    import httpx

    url, stop_at = f"http://127.0.0.1:{port}", time.monotonic() + args.seconds
    big = huge_png()
    good: list[float] = []
    health: list[float] = []
    codes: dict[str, list[int]] = {"good": [], "huge": [], "malformed": []}
    closed_after: list[float] = []
    lock = threading.Lock()

    def post(kind: str, **kwargs: Any) -> None:
        start = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            code = httpx.post(f"{url}/predict", timeout=30, **kwargs).status_code
            with lock:
                codes[kind].append(code)
                if kind == "good" and code == 200:
                    good.append((time.perf_counter() - start) * 1000)

    def probe() -> None:
        start = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                health.append((time.perf_counter() - start) * 1000)
        time.sleep(0.05)

    def malformed() -> None:
        for body, ctype in MALFORMED:
            post("malformed", content=body, headers={"content-type": ctype})

    jobs: list[tuple[int, Callable[[], None]]] = [
        (args.requests, lambda: post("good", files={"image": ("img", image, "image/jpeg")})) for _ in range(4)
    ]
    jobs += [(args.huge, lambda: post("huge", files={"image": ("big.png", big, "image/png")})) for _ in range(6)]
    jobs += [(50, malformed), (100_000, probe)]
    threads = [threading.Thread(target=_repeat, args=(stop_at, n, job)) for n, job in jobs]
    threads += [threading.Thread(target=_slow_client, args=(port, stop_at, closed_after)) for _ in range(args.slow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "good": _percentiles(good),
        "health": _percentiles(health),
        "statuses": {k: dict(sorted(Counter(v).items())) for k, v in codes.items()},
        "slow_clients": {"n": args.slow, "closed_by_server": len(closed_after), "max_s": max(closed_after, default=0)},
    }


def mixed_markdown(result: dict[str, Any], header: str) -> str:
    """The mixed scenario's result as Markdown."""
    rows = [
        f"| {name} | {r['n']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |"
        for name, r in (("good /predict", result["good"]), ("GET /health", result["health"]))
    ]
    slow = result["slow_clients"]
    cut = f"slow clients: {slow['closed_by_server']} of {slow['n']} closed by the server, after {slow['max_s']:.1f} s"
    table = ["| requests | ok | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|", *rows]
    return "\n".join([header, "", *table, "", f"statuses: {json.dumps(result['statuses'])}", cut])


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    ap.add_argument("--scenario", choices=("batching", "mixed"), default="batching")
    ap.add_argument("--seconds", type=float, default=20, help="mixed: how long the load lasts")
    ap.add_argument("--huge", type=int, default=3, help="mixed: 6000x6000 PNGs each of 6 clients sends")
    ap.add_argument("--slow", type=int, default=150, help="mixed: clients trickling their headers")
    args = ap.parse_args(argv)
    image, image_name = sample_image(args.image)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or demo_checkpoint(Path(tmp) / "run")
        if args.scenario == "mixed":
            port = free_port()
            proc = start_server(ckpt, port, [], Path(tmp) / "server.log")
            try:
                result = mixed_load(port, image, args)
            finally:
                stop_server(proc)
        else:
            rows = [measure(ckpt, b, args, image, Path(tmp) / f"server_{b}.log") for b in (1, args.max_batch_size)]
    model = args.ckpt or "untrained efficientnet_lite0 32 px"
    record: dict[str, Any]
    if args.scenario == "mixed":
        header = (
            f"transfer.serve under abuse for {args.seconds:g} s: 4 clients of good uploads ({image_name}), 6 of "
            f"6000x6000 PNGs, {args.slow} trickling headers, 1 of malformed bodies, 1 polling /health; model "
            f"{model}; {os.cpu_count()} CPUs."
        )
        text, record = mixed_markdown(result, header), {"header": header, "mixed": result}
    else:
        header = (
            f"transfer.serve load test: {args.requests} requests from {args.concurrency} client threads, "
            f"model {model}, image {image_name}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs."
        )
        text, record = markdown(rows, header), {"header": header, "rows": rows}
    print(text)
    print(json.dumps({"serve_load": record}))
    out = Path.cwd() / "outputs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(f"serve_{args.scenario}_%Y-%m-%d_%H-%M-%S")
    (out / f"{stamp}.md").write_text(text + "\n")
    (out / f"{stamp}.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
