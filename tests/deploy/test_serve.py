"""The served model: the request gate, its limits and the LitServe API in process (default suite), and a real
``python -m transfer.serve`` on 127.0.0.1 talked to with a real HTTP client, abused (huge images, trickling
clients) and stopped with SIGTERM (``-m slow``: ~15 s to start each server)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.deploy.test_export import make_run
from tests.helpers import CLASSES, make_image_folder
from tests.in_process import run_tool
from transfer.benchmarks.serve_load import free_port, group_alive, huge_png, load, markdown, start_server, stop_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("litserve")


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


BAD_REQUESTS = [
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not accepted"),
    ({"data": {"image": "x"}}, 415, "not accepted"),  # a form without a file: urlencoded
    ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"[" * 40_000, "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    (
        {"content": b'{"a":' * 4_000 + b"1" + b"}" * 4_000, "headers": {"content-type": "application/json"}},
        400,
        "nested too deeply",
    ),  # valid JSON, too deep for the parser: still the client's error, not a 500
    ({"json": {"picture": "abc"}}, 400, 'need {"image"'),
    ({"json": {"image": "%%% not base64"}}, 400, "not valid base64"),
    ({"json": {"image": base64.b64encode(b"just some text").decode()}}, 400, "not an image"),
    ({"files": {"image": ("notes.txt", b"plain text", "text/plain")}}, 400, "not an image"),
    ({"files": {"other": ("a.png", b"", "image/png")}, "data": {"k": "v"}}, 400, "not an image"),
    ({"files": {"image": ("big.png", png_bytes(size=256), "image/png")}}, 413, "limit"),
]


@pytest.fixture(scope="module")
def gate():
    """A test client for :class:`ImageGate` (50 kB limit) in front of an app that echoes the JSON it receives."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from transfer.deploy.serve import ImageGate

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"received": await request.json(), "type": request.headers["content-type"]})

    app = Starlette(routes=[Route("/predict", echo, methods=["POST"])])
    app.add_middleware(ImageGate, path="/predict", max_bytes=50_000)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("kwargs, status, message", BAD_REQUESTS)
def test_the_gate_answers_bad_requests_with_a_clear_4xx(gate, kwargs, status, message):
    response = gate.post("/predict", **kwargs)
    assert response.status_code == status and message in response.json()["detail"], response.text


def test_the_gate_hands_the_worker_the_image_as_base64_json(gate):
    data = png_bytes(2)
    encoded = base64.b64encode(data).decode()
    for kwargs in (
        {"files": {"image": ("x.png", data, "image/png")}},
        {"json": {"image": encoded}},
        {"json": {"image": "data:image/png;base64," + encoded}},
    ):
        answer = gate.post("/predict", **kwargs).json()
        assert answer == {"received": {"image": encoded}, "type": "application/json"}


def test_the_api_batches_and_answers_the_checkpoints_topk(tmp_path: Path):
    from transfer.deploy.load import load_classifier
    from transfer.deploy.predict import predict
    from transfer.deploy.serve import ClassifierAPI

    root = make_image_folder(tmp_path / "data", {"test": 1})
    make_run(tmp_path / "run", root)
    images = sorted((root / "test").glob("*/*.png"))
    api = ClassifierAPI(str(tmp_path / "run"), topk=2, max_batch_size=8)
    api.setup("cpu")
    inputs = [api.decode_request({"image": base64.b64encode(p.read_bytes()).decode()}) for p in images]
    answers = [api.encode_response(out) for out in api.unbatch(api.predict(api.batch(inputs)))]
    expected = predict(load_classifier(str(tmp_path / "run")), images, topk=2)
    assert [a["batched_with"] for a in answers] == [3, 3, 3]  # one forward pass served the three requests
    for answer, want in zip(answers, expected, strict=True):
        assert [t["class"] for t in answer["topk"]] == [c for c, _ in want["topk"]] and answer["label"] == want["label"]
        assert all(abs(t["prob"] - p) < 1e-5 for t, (_, p) in zip(answer["topk"], want["topk"], strict=True))


def test_a_body_that_does_not_arrive_in_time_is_a_408():
    from transfer.deploy.serve import BadRequest, read_body

    async def trickle() -> dict:
        await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"x", "more_body": True}  # one byte at a time, forever

    with pytest.raises(BadRequest) as err:
        asyncio.run(read_body(trickle, limit=10_000, timeout=0.2))
    assert err.value.status == 408 and "read_timeout" in err.value.detail


def test_a_large_image_waits_for_a_decode_slot_then_gets_a_503_with_retry_after():
    from transfer.deploy.serve import BadRequest, ImageGate

    gate = ImageGate(None, max_decodes=1, decode_wait=0.05)

    async def busy_then_free() -> tuple[BadRequest, bytes]:
        await gate.slots.acquire()  # another large image is decoding
        try:
            await gate._decode_large(png_bytes())
        except BadRequest as err:
            refused = err
        gate.slots.release()
        return refused, await gate._decode_large(png_bytes(4))

    refused, passed = asyncio.run(busy_then_free())
    assert refused.status == 503 and refused.headers == {"Retry-After": "1"}
    assert passed == png_bytes(4)  # with the slot free: decoded, checked and passed on


def test_an_image_over_the_pixel_budget_is_refused_from_its_header():
    from transfer.deploy.serve import BadRequest, checked_image

    with pytest.raises(BadRequest) as err:
        checked_image(png_bytes(size=64), max_pixels=64 * 64 - 1)
    assert err.value.status == 413 and "Mpx limit" in err.value.detail
    assert checked_image(png_bytes(size=64), max_pixels=64 * 64) == png_bytes(size=64)


@pytest.mark.parametrize("native_size", [None, 32])
def test_a_large_image_is_shrunk_for_the_worker_without_changing_what_the_model_sees(native_size):
    from transfer.core.preprocess import Preprocess
    from transfer.data.transforms import eval_transform
    from transfer.deploy.serve import checked_image, first_resize

    pre = Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, native_size=native_size)
    big = png_bytes(5, size=300)
    small = checked_image(big, shrink=first_resize(pre))
    assert len(small) < len(big) and max(Image.open(io.BytesIO(small)).size) < 300
    transform = eval_transform(pre)
    seen = [transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in (big, small)]
    assert torch.equal(seen[0], seen[1])
    tiny = png_bytes(6, size=16)
    assert checked_image(tiny, shrink=first_resize(pre)) == tiny  # never enlarged: the upload passes as it is


def test_uvicorn_gets_the_configs_read_deadlines_and_header_cap():
    from hydra import compose, initialize_config_module

    from transfer.deploy.serve import HeaderDeadlineH11, uvicorn_options

    with initialize_config_module("transfer.conf", version_base="1.3"):
        cfg = compose("tools/serve", overrides=["ckpt=x", "read_timeout=7", "keep_alive=3", "max_header_kb=8"])
    options = uvicorn_options(cfg)
    assert issubclass(options.pop("http"), HeaderDeadlineH11)
    assert uvicorn_options(cfg)["http"].header_timeout == 7.0
    assert options == {"timeout_keep_alive": 3, "h11_max_incomplete_event_size": 8 * 1024}


class FakeTransport:
    """The little of an asyncio transport that uvicorn's h11 protocol touches."""

    def __init__(self) -> None:
        self.closed, self.written = False, b""

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 5), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_protocol(self, protocol) -> None: ...


@pytest.mark.parametrize(
    "request_bytes, closed",
    [(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: a", True), (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", False)],
)
def test_a_connection_whose_headers_trickle_is_closed_after_the_read_timeout(request_bytes, closed):
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from transfer.deploy.serve import HeaderDeadlineH11

    async def app(scope, receive, send) -> None:  # a slow answer: the request is in, past the header deadline
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def connect() -> bool:
        protocol_class = type("P", (HeaderDeadlineH11,), {"header_timeout": 0.1})
        config = Config(app, timeout_keep_alive=5)
        config.load()
        protocol = protocol_class(config, ServerState(), {}, _loop=asyncio.get_running_loop())
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(request_bytes)
        await asyncio.sleep(0.25)
        closed_by_deadline = transport.closed
        await asyncio.gather(*protocol.tasks)
        return closed_by_deadline

    assert asyncio.run(connect()) is closed


# The real server: a child process that takes ~15 s to start, so these run with -m slow; the tests above cover
# the gate and the API in process.
SERVER = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """``(base_url, run_dir, image folder)``: a LeNet-5 checkpoint served with batching (up to 8, 0.2 s wait) and a
    50 kB body limit."""
    tmp = tmp_path_factory.mktemp("serve")
    root = make_image_folder(tmp / "data", {"test": 2})
    run_dir = tmp / "run"
    make_run(run_dir, root)
    port = free_port()
    proc = start_server(
        run_dir, port, ["max_batch_size=8", "batch_timeout=0.2", "topk=2", "max_image_mb=0.05"], tmp / "server.log"
    )
    try:
        yield f"http://127.0.0.1:{port}", run_dir, root
    finally:
        stop_server(proc)


@SERVER
def test_health_and_info(server):
    url, _, _ = server
    assert httpx.get(f"{url}/health").text.strip('"') == "ok"
    info = httpx.get(f"{url}/info").json()["model"]
    assert info["classes"] == list(CLASSES) and info["image_size"] == 32 and info["max_batch_size"] == 8


@SERVER
def test_upload_and_base64_give_the_checkpoints_topk(server):
    from transfer.deploy.predict import predict
    from transfer.training.module import Classifier

    url, run_dir, root = server
    image = sorted((root / "test" / "dog").iterdir())[0]
    data = image.read_bytes()
    upload = httpx.post(f"{url}/predict", files={"image": ("dog.png", data, "image/png")}, timeout=60)
    as_json = httpx.post(f"{url}/predict", json={"image": base64.b64encode(data).decode()}, timeout=60)
    data_url = httpx.post(f"{url}/predict", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()})
    assert upload.status_code == as_json.status_code == data_url.status_code == 200, upload.text
    answer = upload.json()
    assert len(answer["topk"]) == 2 and answer["label"] == answer["topk"][0]["class"] in CLASSES
    assert [t["class"] for t in as_json.json()["topk"]] == [t["class"] for t in answer["topk"]]
    expected = predict(Classifier.from_checkpoint(run_dir / "checkpoints" / "last.ckpt"), [image], topk=2)[0]
    assert [t["class"] for t in answer["topk"]] == [c for c, _ in expected["topk"]]
    assert all(abs(t["prob"] - p) < 1e-5 for t, (_, p) in zip(answer["topk"], expected["topk"], strict=True))


@SERVER
def test_concurrent_requests_are_batched(server):
    url = server[0]

    def one(seed: int) -> dict:
        return httpx.post(f"{url}/predict", files={"image": ("x.png", png_bytes(seed), "image/png")}, timeout=60).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    assert all(a["label"] in CLASSES for a in answers)
    assert max(a["batched_with"] for a in answers) > 1  # at least one forward pass served several requests


@SERVER
@pytest.mark.parametrize("kwargs, status, message", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, kwargs, status, message):
    url = server[0]
    response = httpx.post(f"{url}/predict", timeout=60, **kwargs)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert httpx.get(f"{url}/health").status_code == 200
    ok = httpx.post(f"{url}/predict", files={"image": ("x.png", png_bytes(1), "image/png")}, timeout=60)
    assert ok.status_code == 200


@SERVER
def test_a_bad_request_in_a_busy_batch_fails_alone(server):
    url = server[0]

    def one(i: int) -> int:
        body = b"not an image" if i % 2 else png_bytes(i)
        return httpx.post(f"{url}/predict", files={"image": ("x.png", body, "image/png")}, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert codes == [200, 400] * 4


def test_unreadable_checkpoint_is_a_clear_error_before_serving(tmp_path):
    proc = run_tool("transfer.serve", f"ckpt={tmp_path}", f"port={free_port()}")
    assert proc.returncode == 2 and "No checkpoint" in proc.stderr


@SERVER
def test_load_test_reports_throughput_and_latency_percentiles(server):
    result = load(f"{server[0]}/predict", png_bytes(3), requests=12, concurrency=4, max_seconds=120)
    assert result["requests_ok"] == 12 and result["errors"] == 0 and result["req_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    table = markdown([{"max_batch_size": 8, "batch_timeout": 0.2, **result}], "header")
    assert table.startswith("header") and "| 8 | 0.2 |" in table


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, subprocess.Popen]]:
    """``(port, process)``: a LeNet-5 checkpoint served with the default limits and a 2 s read timeout."""
    tmp = tmp_path_factory.mktemp("abuse")
    make_run(tmp / "run", make_image_folder(tmp / "data", {"test": 1}))
    port = free_port()
    proc = start_server(tmp / "run", port, ["read_timeout=2"], tmp / "server.log")
    try:
        yield port, proc
    finally:
        stop_server(proc)


def health_latency(port: int, until: Callable[[], bool], most: int = 100) -> list[float]:
    """Seconds each ``GET /health`` took, polled every 50 ms until ``until()`` or ``most`` polls."""
    latencies: list[float] = []
    while not until() and len(latencies) < most:
        start = time.perf_counter()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    return latencies


@SERVER
def test_health_answers_quickly_while_huge_images_decode(plain_server):
    """Six 6000x6000 PNGs (under the pixel cap) decode in the gate's threads, not on the event loop: /health
    answers within 100 ms, or, on a machine so loaded that even an idle server's /health is slower, within
    twice the idle time (decoding on the loop held /health for seconds).

    Decoding on the loop holds /health in every round, so a slow round gets one more: in one full CI run a round
    answered in 0.86 and 0.64 s (idle: 0.03 s), where the test alone, its module and the test beside two busy
    loops all passed: a stall of the whole machine, not of the loop.
    """
    port = plain_server[0]
    big = huge_png()
    idle = float(np.median(health_latency(port, lambda: False, most=10)))

    def upload(_: int) -> int:
        return httpx.post(
            f"http://127.0.0.1:{port}/predict", files={"image": ("big.png", big, "image/png")}, timeout=120
        ).status_code

    def busy_round() -> tuple[list[int], list[float]]:
        with ThreadPoolExecutor(6) as pool:
            uploads = [pool.submit(upload, i) for i in range(6)]
            time.sleep(0.5)  # the uploads are in and decoding
            busy = health_latency(port, lambda: all(u.done() for u in uploads))
            return [u.result() for u in uploads], busy

    def quick(busy: list[float]) -> bool:
        return len(busy) >= 3 and float(np.median(busy)) < max(0.1, 2 * idle + 0.02)

    rounds = [busy_round()]
    if not quick(rounds[0][1]):
        rounds.append(busy_round())
    codes, busy = rounds[-1]
    assert set(codes) <= {200, 503} and 200 in codes  # allowed images are served (or told to retry), never 500
    assert quick(busy), (idle, [b for _, b in rounds])


@SERVER
def test_a_client_trickling_its_headers_is_cut_off(plain_server):
    port = plain_server[0]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        assert sock.recv(1024) == b""  # closed by the server
        assert 1.5 < time.monotonic() - start < 8


@SERVER
def test_a_body_that_never_arrives_gets_a_408(plain_server):
    port = plain_server[0]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


@SERVER
def test_sigterm_stops_the_server_and_all_its_workers(tmp_path: Path):
    make_run(tmp_path / "run", make_image_folder(tmp_path / "data", {"test": 1}))
    proc = start_server(tmp_path / "run", free_port(), [], tmp_path / "server.log")  # its own process group
    try:
        assert len(group_alive(proc.pid)) >= 2  # the server and at least its model worker
        proc.send_signal(signal.SIGTERM)  # the server alone, as a service manager would
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_alive(proc.pid) == [], (tmp_path / "server.log").read_text()[-2000:]
        assert proc.wait(timeout=1) == 0
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
