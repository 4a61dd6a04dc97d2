"""``python -m transfer.predict ckpt=<checkpoint or run dir> images=<file, folder or glob> [topk=5] [grid=true]``

``model=<name>`` instead of ``ckpt=`` predicts with that model's pretrained ImageNet classifier (its original
1000-class head, ImageNet category names, the weights' own preprocessing at their pretrained size): what the
network knows before any fine-tuning. A model whose weights carry no ImageNet head is refused.

``ckpt=`` may also name an exported ``.onnx`` file (``python -m transfer.export``): onnxruntime runs it, with the
class names and preprocessing of the JSON beside it.

Top-k class names and probabilities for new images, from a checkpoint alone: it carries the architecture,
class names, input size and normalisation. Results are printed as a table and written as CSV and JSON (and a
PNG grid with ``grid=true``) into a new folder, ``outputs/predictions/<time>/`` unless ``out=`` says otherwise.
The settings and their defaults are ``conf/tools/predict.yaml`` (``--help`` lists them).
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import Tensor, nn

from transfer.core.errors import ConfigError, CorruptImagesError, WeightsUnavailableError
from transfer.core.escape import csv_row
from transfer.core.exit_status import announce_stop, stop_signal
from transfer.core.preprocess import Preprocess
from transfer.data.decode import failure_reason, read_rgb
from transfer.data.transforms import eval_transform
from transfer.models import architecture, model_preprocess
from transfer.models.weights import fetch, load_file, load_into
from transfer.training.compute import pick_device
from transfer.training.module import Classifier

if TYPE_CHECKING:
    from transfer.deploy.onnx_runtime import OnnxClassifier  # onnxruntime is an optional extra

USAGE = (
    "python -m transfer.predict ckpt=<checkpoint, run dir or exported .onnx> images=<file, folder or glob> "
    "[topk=5] [grid=true] [out=DIR] [device=auto]; or model=<name> instead of ckpt= for that model's "
    "pretrained ImageNet classifier"
)
# An image's header is checked against this before its pixels are decoded (the max_megapixels setting).
DEFAULT_MAX_PIXELS = 50_000_000


@torch.no_grad()
def predict(
    module: Predictor,
    files: list[Path],
    topk: int = 5,
    batch_size: int = 64,
    device: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any]]:
    """Classify image files with a trained module.

    A plain loop rather than ``Trainer.predict`` (which ``transfer.evaluate`` uses): the same function serves an
    onnxruntime session, which is no LightningModule, and a few files need no progress bar.

    Args:
        module: from :func:`~transfer.deploy.load.load_classifier` (a Classifier or an ONNX model) or
            :func:`pretrained_imagenet`; its ``preprocess`` decides the transform.
        files: image paths.
        topk: how many classes to report per image.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        max_pixels: an image whose header declares more pixels is not decoded (``None``: no cap of ours).

    Returns:
        One dict per image, in the order of ``files``: ``image``, ``label`` (top-1), ``prob``, ``topk`` (list of
        [class, prob]), ``true`` (the parent folder's name when it is one of the classes, else ``None``) and
        ``error``: ``None``, or why the file could not be read (then ``label`` and ``prob`` are ``None`` and
        ``topk`` is empty). One unreadable file never stops the others.
    """
    pre = module.preprocess
    if pre is None:
        raise ConfigError("The checkpoint has no preprocessing record; it was not written by transfer.run.")
    transform = eval_transform(pre)
    dev = pick_device(device)
    module = module.to(dev).eval()
    names = module.class_names
    k = min(topk, len(names))
    results: list[dict[str, Any]] = []
    try:
        _predict_batches(module, files, batch_size, transform, max_pixels, dev, k, results)
    except KeyboardInterrupt as stop:  # SIGINT/SIGTERM: the command's graceful_exit gives 128 + the signal
        done = f"after {len(results)} of {len(files)} images; no results were written."
        announce_stop(stop_signal(stop) or signal.SIGINT, done)
        raise
    return results


def _predict_batches(
    module: Predictor,
    files: list[Path],
    batch_size: int,
    transform: Any,
    max_pixels: int | None,
    dev: torch.device,
    k: int,
    results: list[dict[str, Any]],
) -> None:
    """Append one result per file to ``results`` (see :func:`predict`), a batch at a time."""
    names = module.class_names
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded = [_decode(f, transform, max_pixels) for f in chunk]
        good = [x for x in decoded if isinstance(x, Tensor)]
        tops: list[list[list[Any]]] = []
        if good:
            values, indices = module(torch.stack(good).to(dev)).softmax(dim=-1).cpu().topk(k, dim=-1)
            for v, i in zip(values, indices, strict=True):
                tops.append([[names[j], round(float(p), 6)] for p, j in zip(v, i, strict=True)])
        scored = iter(tops)
        for f, x in zip(chunk, decoded, strict=True):
            top = next(scored) if isinstance(x, Tensor) else []
            results.append(
                {
                    "image": str(f),
                    "label": top[0][0] if top else None,
                    "prob": top[0][1] if top else None,
                    "topk": top,
                    "true": f.parent.name if f.parent.name in names else None,
                    "error": None if isinstance(x, Tensor) else x,
                }
            )


def _decode(path: Path, transform: Any, max_pixels: int | None) -> Tensor | str:
    """The model's input for one file, or why it cannot be read (as training data is read: any mode, EXIF)."""
    try:
        return transform(read_rgb(path, max_pixels=max_pixels))
    except Exception as err:  # truncated, not an image, too large, unsupported mode: that file only
        return failure_reason(err)


class ImageNetClassifier(nn.Module):
    """A registry model with its original ImageNet head: what :func:`predict` needs of a module, and no more.

    Attributes:
        net: the ImageNet-shaped network with every pretrained tensor, its 1000-class classifier included.
        class_names: the ImageNet category names, in the classifier's order.
        preprocess: the weights' preprocessing at their pretrained size (photos: resize, then centre crop).
    """

    def __init__(self, net: nn.Module, class_names: list[str], preprocess: Preprocess) -> None:
        super().__init__()
        self.net = net
        self.class_names = class_names
        self.preprocess = preprocess

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits for a normalised batch."""
        return self.net(x)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k category names in class-index order (timm's offline copy; the first synonym each)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


def pretrained_imagenet(name: str, weights: str | None = None) -> ImageNetClassifier:
    """The pretrained ImageNet classifier of registry model ``name``, head and all.

    Args:
        name: registry name, e.g. ``efficientnet_lite0``.
        weights: a local state-dict file to load instead of the registry's source (``model.weights=PATH``).

    Returns:
        An :class:`ImageNetClassifier` in eval mode.

    Raises:
        ConfigError: unknown model, weights that cannot be had (offline, not installed) or that carry no
            ImageNet classifier.
    """
    arch = architecture(name)
    use_ckpt = "to predict with a model you trained, pass ckpt=<checkpoint or run dir> instead of model="
    source = arch.pretrained_cfg.source
    if source is None and not weights:
        raise ConfigError(f"model={name} has no pretrained weights, so it has no ImageNet classifier; {use_ckpt}.")
    net = arch.build()
    try:
        if weights:
            state = load_file(weights)
        else:
            assert source is not None  # refused above otherwise
            state = fetch(source, name)
        if arch.convert is not None:
            state = arch.convert(state)
        load_into(net, state, source, origin=str(weights or name))  # no optional tensors: the head too
    except WeightsUnavailableError as err:
        raise ConfigError(
            f"model={name} cannot predict ImageNet classes here: its pretrained weights could not be loaded "
            f"with their ImageNet classifier ({str(err)[:300]}). Use a model whose weights carry the 1000-class "
            f"head and are available offline (model=efficientnet_lite0 ships in a pip package), or {use_ckpt}."
        ) from err
    categories = imagenet_categories()
    width = _output_width(net, arch.classifier)
    if width != len(categories):
        raise ConfigError(
            f"model={name}'s pretrained classifier has {width} outputs, not the {len(categories)} ImageNet-1k "
            f"classes, so there are no category names for it; {use_ckpt}."
        )
    return ImageNetClassifier(net, categories, model_preprocess(name, "resize", None, None)).eval()


def _output_width(net: nn.Module, classifier: str) -> int:
    """Number of logits of the classifier (the tensors named ``classifier*``), else of the last linear layer."""
    heads = [
        v for k, v in net.state_dict().items() if k.startswith(classifier) and k.endswith("weight") and v.ndim == 2
    ]
    if classifier and heads:
        return int(heads[-1].shape[0])
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


# what predict() runs: a trained checkpoint, an exported ONNX model or a pretrained ImageNet classifier
Predictor: TypeAlias = "Classifier | ImageNetClassifier | OnnxClassifier"


def write_results(results: list[dict[str, Any]], out: Path) -> None:
    """``predictions.json`` and ``predictions.csv`` (one row per image, top-k flattened, then ``error``).

    Cells a spreadsheet would evaluate (a class or file named ``=...``) are escaped
    (:func:`~transfer.core.escape.csv_cell`).

    Raises:
        ConfigError: ``out`` cannot be written (full disk, read-only, a path through a file).
    """
    k = max(len(r["topk"]) for r in results)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(results, indent=1))
        with open(out / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            header = ["image", "true"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("class", "prob")] + ["error"]
            writer.writerow(header)
            for r in results:
                cells = [x for pair in r["topk"] for x in pair] + [""] * (2 * (k - len(r["topk"])))
                writer.writerow(csv_row([r["image"], r["true"] or "", *cells, r["error"] or ""]))
    except OSError as err:
        raise ConfigError(
            f"The predictions cannot be written into out={out} ({type(err).__name__}: {err.strerror or err}). "
            f"Free space there, make it writable, or pass out=<another folder>."
        ) from err


def failed_images(results: list[dict[str, Any]]) -> CorruptImagesError | None:
    """The error a prediction ends with when some images could not be read (``None`` when all were)."""
    bad = [r for r in results if r["error"]]
    if not bad:
        return None
    shown = "; ".join(f"{r['image']} ({r['error']})" for r in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return CorruptImagesError(
        f"{len(bad)} of {len(results)} image(s) could not be read: {shown}{more}. The others were predicted; "
        f"the CSV/JSON list every image, the failed ones with their error. Replace or remove those files, raise "
        f"max_megapixels= for a large one, or pass skip_corrupt=true to exit with status 0 anyway."
    )


def print_table(results: list[dict[str, Any]], limit: int = 50) -> None:
    """A readable table of the first ``limit`` predictions (an unreadable image: its error), under a header row."""
    width = min(60, max(len("image"), *(len(Path(r["image"]).name) for r in results)))
    known = any(r["true"] is not None for r in results[:limit])
    print(
        f"{'image':<{width}}  {'prediction':<14} {'prob':<5}  [next classes, prob]" + ("  true label" if known else "")
    )
    for r in results[:limit]:
        if r["error"]:
            print(f"{Path(r['image']).name[:width]:<{width}}  not read: {r['error']}")
            continue
        others = ", ".join(f"{c} {p:.2f}" for c, p in r["topk"][1:3])
        mark = "" if r["true"] is None else (" ok" if r["true"] == r["label"] else f" (true: {r['true']})")
        print(f"{Path(r['image']).name[:width]:<{width}}  {r['label']:<14} {r['prob']:.3f}  [{others}]{mark}")
    if len(results) > limit:
        print(f"... {len(results) - limit} more in the CSV/JSON")
