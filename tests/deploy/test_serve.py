"""The served model: the request gate and the LitServe API in process (default suite), and a real
``python -m transfer.serve`` on 127.0.0.1 talked to with a real HTTP client (``-m slow``: ~15 s to start)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.deploy.test_export import make_run
from tests.helpers import CLASSES, make_image_folder
from tests.in_process import run_tool
from transfer.benchmarks.serve_load import free_port, load, markdown, start_server, stop_server

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
