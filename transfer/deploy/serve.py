"""``python -m transfer.serve ckpt=<checkpoint, run dir or exported .onnx> [port=8000] [host=127.0.0.1]``

An HTTP endpoint on LitServe (``pip install -e ".[serve]"``) that classifies one image per request:

* ``POST /predict`` with the image as a multipart file upload (field ``image``, or the first file) or as JSON
  ``{"image": "<base64>"}`` (a ``data:image/...;base64,`` prefix is accepted) returns
  ``{"label", "prob", "topk": [{"class", "prob"}, ...], "batched_with"}``;
* ``GET /health`` answers ``ok`` once the model is loaded; ``GET /info`` describes the model.

Requests are batched dynamically: the worker takes up to ``max_batch_size`` waiting requests (waiting at most
``batch_timeout`` s for more) into one forward pass. Bad requests never reach the model: :class:`ImageGate`
answers a wrong content type with 415, a body over ``max_image_mb`` with 413, and anything that does not decode
to an image (bad JSON, bad base64, a text file) with 400, each with a one-line ``detail``; so one client's bad
upload cannot fail the batch it would have joined.

Abuse is bounded so that one client cannot stall the others or ``/health``: the gate parses, decodes and
checks images in threads, off the event loop (images over 4 Mpx ``max_decodes`` at once, in a pool of their
own; one that waits ``decode_wait`` s for a slot gets 503 with ``Retry-After``), refuses an image over
``max_image_mpx`` megapixels before decoding it, shrinks a large photo to the model's first resize step before
it goes to the worker (so the worker never decodes it at full size), and gives a request's body
``read_timeout`` s to arrive (408). :class:`HeaderDeadlineH11` closes a connection whose request headers take
longer than that, and idle keep-alive connections close after ``keep_alive`` s. SIGTERM stops the server and
its workers (:func:`serve`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
import signal
import threading
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.transforms import Resize

from transfer.core.errors import ConfigError
from transfer.data.transforms import eval_transform
from transfer.deploy.load import load_classifier

try:
    import h11
    import litserve as ls
    from fastapi import HTTPException
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # the [serve] extra is optional; main() says how to install it
    ls = None

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ALLOWED_TYPES = ("application/json", "multipart/form-data")
MAX_PIXELS = 40_000_000  # larger images are refused rather than decoded (decompression bombs)
LARGE_PIXELS = 4_000_000  # a 2000x2000 photo decodes in tens of ms; larger ones take the bounded decode slots
Shrink = Callable[[Image.Image], Image.Image]


class BadRequest(Exception):
    """A request the endpoint refuses: HTTP ``status``, a one-line ``detail`` and any response headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def checked_image(data: bytes, max_pixels: int = MAX_PIXELS, shrink: Shrink | None = None) -> bytes:
    """The image the worker gets: ``data`` once it decodes to an image of at most ``max_pixels``, or a PNG of
    ``shrink(image)`` where that is smaller; :class:`BadRequest` (400, 413) otherwise.

    ``shrink`` is the model's first resize step, so the worker's own resize of the shrunk image changes nothing
    and the answer is the one the full image would get; the PNG is lossless.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:  # the header only: refused before anything is decoded
                raise BadRequest(
                    413, f"Image of {image.width}x{image.height} px is over the {max_pixels / 1e6:g} Mpx limit."
                )
            rgb = image.convert("RGB")
    except BadRequest:
        raise
    except Exception as err:  # PIL raises many types for undecodable data
        raise BadRequest(
            400, f"The upload is not an image PIL can decode (PNG, JPEG, ...): {type(err).__name__}."
        ) from err
    small = shrink(rgb) if shrink is not None else rgb
    if small.width * small.height >= rgb.width * rgb.height:
        return data
    buf = io.BytesIO()
    small.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def json_image(body: bytes) -> bytes:
    """The image bytes of a JSON body ``{"image": "<base64>"}``; any malformed JSON, however deep, is a 400."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise BadRequest(400, f"The body is not valid JSON ({reason}).") from err
    return b64_image(payload.get("image") if isinstance(payload, dict) else None)


def b64_image(value: Any) -> bytes:
    """Bytes of a base64 image string (optionally a ``data:`` URL); :class:`BadRequest` when it is not one."""
    if not isinstance(value, str) or not value:
        raise BadRequest(400, 'JSON requests need {"image": "<base64-encoded image>"}.')
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(400, "The 'image' field is not valid base64.") from err


async def read_body(receive: Receive, limit: int, timeout: float | None = None) -> bytes:
    """The whole request body; :class:`BadRequest` 413 as soon as it passes ``limit`` bytes, 408 when it has not
    all arrived within ``timeout`` seconds (a client trickling its body holds a connection and a task)."""
    try:
        return await asyncio.wait_for(_read_body(receive, limit), timeout)
    except asyncio.TimeoutError as err:  # not yet the builtin TimeoutError on Python 3.10
        raise BadRequest(408, f"The request body did not arrive within {timeout:g} s (read_timeout).") from err


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "The client disconnected before sending the whole body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"Request body over the {limit / 1e6:g} MB limit (max_image_mb).")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (for disconnects)."""
    sent = False

    async def _receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


async def multipart_image(scope: Scope, body: bytes) -> bytes:
    """The uploaded file of a multipart body (field ``image``, else the first file)."""
    from starlette.requests import Request

    async def _none() -> Message:
        return {"type": "http.disconnect"}

    try:
        form = await Request(scope, replay(body, _none)).form(max_files=4, max_fields=16)
    except Exception as err:  # malformed multipart
        raise BadRequest(400, f"Malformed multipart body ({type(err).__name__}).") from err
    files = [v for k, v in form.multi_items() if hasattr(v, "read")]
    named = form.get("image")
    upload = named if hasattr(named, "read") else (files[0] if files else None)
    if upload is None:
        raise BadRequest(400, "Multipart requests need the image as a file field (name it 'image').")
    return await upload.read()


def _lower_priority() -> None:
    """Nice the calling thread (a Linux thread is a task of its own), so that the event loop and small requests
    get a CPU before large decodes do, also when these keep every core busy."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class ImageGate:
    """ASGI middleware in front of the predict route: checks content type, size and image, then hands the
    worker a plain ``{"image": "<base64>"}`` JSON body (so uploads need not be pickled to the worker).

    The CPU work (JSON parsing, base64, decoding) runs in threads, never on the event loop (PIL releases the
    GIL while it decodes), so ``/health`` is answered while images decode. Images over ``LARGE_PIXELS`` are
    decoded ``max_decodes`` at a time in a pool of their own, so small uploads never wait behind them.

    Args:
        app: the wrapped ASGI app.
        path: the predict route.
        max_bytes: the largest accepted request body.
        max_pixels: the largest accepted image (width x height), checked before it is decoded.
        max_decodes: large images decoded at once.
        decode_wait: seconds a large image waits for a decode slot before it gets 503 with ``Retry-After``.
        read_timeout: seconds a request's body may take to arrive (408 after that); ``None``: no limit.
        shrink: the model's first resize step, applied before the image goes to the worker.
    """

    def __init__(
        self,
        app: Any,
        path: str = "/predict",
        max_bytes: int = 10_000_000,
        max_pixels: int = MAX_PIXELS,
        max_decodes: int = 2,
        decode_wait: float = 10.0,
        read_timeout: float | None = 10.0,
        shrink: Shrink | None = None,
    ) -> None:
        self.app, self.path, self.max_bytes, self.max_pixels = app, path, int(max_bytes), int(max_pixels)
        self.decode_wait, self.read_timeout, self.shrink = float(decode_wait), read_timeout, shrink
        self.max_decodes = max(1, int(max_decodes))
        self.slots = asyncio.Semaphore(self.max_decodes)
        self.heavy = ThreadPoolExecutor(self.max_decodes, "image-gate-large", initializer=_lower_priority)
        self.light = ThreadPoolExecutor(2, thread_name_prefix="image-gate")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            data = await self._image_bytes(scope, receive)
        except BadRequest as err:
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)
            await response(scope, receive, send)
            return
        body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.app({**scope, "headers": headers}, replay(body, receive), send)

    async def _image_bytes(self, scope: Scope, receive: Receive) -> bytes:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ALLOWED_TYPES:
            raise BadRequest(
                415,
                f"Content type {ctype or '(none)'!r} is not accepted: send the image as "
                f"multipart/form-data (file field 'image') or application/json "
                f'{{"image": "<base64>"}}.',
            )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise BadRequest(
                413,
                f"Request body of {int(declared) / 1e6:.1f} MB is over the "
                f"{self.max_bytes / 1e6:g} MB limit (max_image_mb).",
            )
        body = await read_body(receive, self.max_bytes, self.read_timeout)
        upload = await multipart_image(scope, body) if ctype == "multipart/form-data" else None
        loop = asyncio.get_running_loop()
        data, pixels = await loop.run_in_executor(self.light, self._peek, body, upload)
        if pixels <= LARGE_PIXELS:  # decoded at once: small uploads never queue behind large ones
            return await loop.run_in_executor(self.light, checked_image, data, self.max_pixels, self.shrink)
        return await self._decode_large(data)

    def _peek(self, body: bytes, upload: bytes | None) -> tuple[bytes, int]:
        """The image bytes and their pixel count, from the image's header alone."""
        data = json_image(body) if upload is None else upload
        try:
            with Image.open(io.BytesIO(data)) as image:
                return data, image.width * image.height
        except Exception as err:  # PIL raises many types for undecodable data
            raise BadRequest(
                400, f"The upload is not an image PIL can decode (PNG, JPEG, ...): {type(err).__name__}."
            ) from err

    async def _decode_large(self, data: bytes) -> bytes:
        """Decode a large image once one of ``max_decodes`` slots is free; 503 when none frees up in time."""
        try:
            await asyncio.wait_for(self.slots.acquire(), self.decode_wait)
        except asyncio.TimeoutError as err:  # not yet the builtin TimeoutError on Python 3.10
            raise BadRequest(
                503,
                f"The server is decoding {self.max_decodes} large images already; retry in a second.",
                headers={"Retry-After": "1"},
            ) from err
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.heavy, checked_image, data, self.max_pixels, self.shrink)
        finally:
            self.slots.release()


def topk_response(probs: torch.Tensor, names: list[str], k: int, batched_with: int) -> dict[str, Any]:
    """The JSON answer for one image's probabilities."""
    values, indices = probs.topk(min(k, len(names)))
    top = [{"class": names[int(i)], "prob": round(float(v), 6)} for v, i in zip(values, indices, strict=True)]
    return {"label": top[0]["class"], "prob": top[0]["prob"], "topk": top, "batched_with": batched_with}


if ls is not None:

    class ClassifierAPI(ls.LitAPI):
        """LitServe API: decode one image per request, classify batches, answer top-k.

        Args:
            ckpt: checkpoint, run directory or exported ``.onnx``.
            topk: classes per answer.
            max_batch_size: dynamic batching's largest batch (1: no batching).
            batch_timeout: seconds a batch waits to fill.
        """

        def __init__(self, ckpt: str, topk: int = 5, max_batch_size: int = 16, batch_timeout: float = 0.01) -> None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
            self.ckpt, self.topk = ckpt, topk

        def setup(self, device: str) -> None:
            self.device_name = "cpu" if device in ("auto", None) else device
            self.model = load_classifier(self.ckpt).to(self.device_name).eval()
            self.names = list(self.model.class_names)
            self.transform = eval_transform(self.model.preprocess)

        def decode_request(self, request):  # no annotation on purpose: LitServe reads an annotation as a
            # FastAPI parameter type; unannotated, it passes the parsed JSON body ({"image": "<base64>"}).
            try:  # ImageGate has already checked the image; this is the worker's own safety net
                return self.transform(Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB"))
            except Exception as err:
                raise HTTPException(400, f"Could not decode the image ({type(err).__name__}).") from err

        def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(inputs)

        @torch.inference_mode()
        def predict(self, x: torch.Tensor) -> torch.Tensor:
            single = x.dim() == 3  # max_batch_size=1: LitServe hands over one decoded request
            probs = self.model(x[None] if single else x).float().softmax(-1).cpu()
            return probs[0] if single else probs

        def unbatch(self, output: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
            return [(row, len(output)) for row in output]

        def encode_response(self, output: Any) -> dict[str, Any]:
            probs, n = output if isinstance(output, tuple) else (output, 1)
            return topk_response(probs, self.names, self.topk, n)


def first_resize(preprocess: Any) -> Shrink | None:
    """The eval transform's first step when it is a resize: what the gate may apply to a large image without
    changing the answer (the worker's own resize of the result is then the identity)."""
    steps = getattr(eval_transform(preprocess), "transforms", [])
    if steps and isinstance(steps[0], Resize):
        return steps[0]
    return None


if ls is not None:

    class HeaderDeadlineH11(H11Protocol):
        """uvicorn's h11 protocol with a deadline on each request's headers: a connection whose headers have not
        all arrived ``header_timeout`` s after it opened (or after the first byte of a keep-alive request) is
        closed, so clients trickling headers cannot hold sockets open. uvicorn itself times out only idle
        keep-alive connections."""

        header_timeout: float = 10.0
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._cancel_deadline()
            elif self._deadline is None:  # the first bytes of the next request on a kept-alive connection
                self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()


def uvicorn_options(cfg: DictConfig) -> dict[str, Any]:
    """What :meth:`litserve.LitServer.run` passes on to uvicorn: the read deadlines and the header size cap."""
    protocol = type("Protocol", (HeaderDeadlineH11,), {"header_timeout": float(cfg.read_timeout)})
    return {
        "http": protocol,
        "timeout_keep_alive": int(cfg.keep_alive),
        "h11_max_incomplete_event_size": int(cfg.max_header_kb * 1024),
    }


def gate_options(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """:class:`ImageGate`'s arguments for ``cfg`` and the served ``model``."""
    return {
        "path": "/predict",
        "max_bytes": int(cfg.max_image_mb * 1e6),
        "max_pixels": int(cfg.max_image_mpx * 1e6),
        "max_decodes": int(cfg.max_decodes),
        "decode_wait": float(cfg.decode_wait),
        "read_timeout": float(cfg.read_timeout),
        "shrink": first_resize(model.preprocess),
    }


def build_server(cfg: DictConfig) -> Any:
    """The :class:`litserve.LitServer` for ``cfg`` (the model is loaded here once to fail early and clearly)."""
    if ls is None:
        raise ConfigError('transfer.serve needs LitServe: pip install -e ".[serve]".')
    model = load_classifier(str(cfg.ckpt))
    api = ClassifierAPI(str(cfg.ckpt), int(cfg.topk), int(cfg.max_batch_size), float(cfg.batch_timeout))
    info = {
        "checkpoint": str(cfg.ckpt),
        "classes": list(model.class_names),
        "image_size": model.preprocess.image_size,
        "max_batch_size": int(cfg.max_batch_size),
    }
    server = ls.LitServer(
        api,
        accelerator=str(cfg.accelerator),
        devices=1,
        workers_per_device=int(cfg.workers),
        timeout=float(cfg.timeout),
        model_metadata=info,
        middlewares=[(ImageGate, gate_options(cfg, model))],
    )
    server.uvicorn_graceful_timeout = float(cfg.shutdown_timeout)  # LitServe's own default waits 30 s
    return server


def _sigterm_handler(owner: int) -> Callable[[int, FrameType | None], None]:
    def _stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked API server re-raises the SIGTERM it handled itself: end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        raise KeyboardInterrupt

    return _stop


def serve(cfg: DictConfig) -> None:
    """Build the server for ``cfg`` and serve on ``cfg.host:cfg.port`` until SIGINT or SIGTERM.

    LitServe shuts its API server and model workers down on ``KeyboardInterrupt`` only; under SIGTERM's default
    action the main process would die alone and leave them running. SIGTERM is therefore turned into the same
    ``KeyboardInterrupt`` as Ctrl-C.
    """
    server = build_server(cfg)
    print(f"serving {cfg.ckpt} on http://{cfg.host}:{cfg.port}/predict (health: /health, model: /info)", flush=True)
    previous = signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid()))
    try:
        server.run(
            host=str(cfg.host),
            port=int(cfg.port),
            generate_client_file=False,
            log_level=str(cfg.log_level),
            **uvicorn_options(cfg),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
