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
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image

from transfer.core.errors import ConfigError
from transfer.data.transforms import eval_transform
from transfer.deploy.load import load_classifier

try:
    import litserve as ls
    from fastapi import HTTPException
except ImportError:  # the [serve] extra is optional; main() says how to install it
    ls = None

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ALLOWED_TYPES = ("application/json", "multipart/form-data")
MAX_PIXELS = 40_000_000  # larger images are refused rather than decoded (decompression bombs)


class BadRequest(Exception):
    """A request the endpoint refuses: HTTP ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def check_image(data: bytes) -> None:
    """Raise :class:`BadRequest` (400) unless ``data`` decodes to an image of sane size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise BadRequest(413, f"Image of {image.width}x{image.height} px is too large to decode.")
            image.convert("RGB")
    except BadRequest:
        raise
    except Exception as err:  # PIL raises many types for undecodable data
        raise BadRequest(
            400, f"The upload is not an image PIL can decode (PNG, JPEG, ...): {type(err).__name__}."
        ) from err


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


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, or :class:`BadRequest` (413) as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
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


class ImageGate:
    """ASGI middleware in front of the predict route: checks content type, size and image, then hands the
    worker a plain ``{"image": "<base64>"}`` JSON body (so uploads need not be pickled to the worker).

    Args:
        app: the wrapped ASGI app.
        path: the predict route.
        max_bytes: the largest accepted request body.
    """

    def __init__(self, app: Any, path: str = "/predict", max_bytes: int = 10_000_000) -> None:
        self.app, self.path, self.max_bytes = app, path, int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            data = await self._image_bytes(scope, receive)
            check_image(data)
        except BadRequest as err:
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": err.detail}, status_code=err.status)(scope, receive, send)
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
        body = await read_body(receive, self.max_bytes)
        if ctype == "multipart/form-data":
            return await multipart_image(scope, body)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(400, f"The body is not valid JSON ({err}).") from err
        return b64_image(payload.get("image") if isinstance(payload, dict) else None)


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
    return ls.LitServer(
        api,
        accelerator=str(cfg.accelerator),
        devices=1,
        workers_per_device=int(cfg.workers),
        timeout=float(cfg.timeout),
        model_metadata=info,
        middlewares=[(ImageGate, {"path": "/predict", "max_bytes": int(cfg.max_image_mb * 1e6)})],
    )
