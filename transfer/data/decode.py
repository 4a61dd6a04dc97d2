"""Reading any image file as 8-bit RGB, and finding the files that cannot be read.

Photo folders are messy: greyscale scans, palette GIFs, transparent PNGs, CMYK JPEGs from print workflows,
16-bit PNGs from scientific cameras, portrait photos whose pixels are stored sideways with an EXIF
orientation tag, and the odd truncated download. :func:`to_rgb` brings every one of them to the 8-bit RGB
the models expect; :func:`read_rgb` opens a file that way; :func:`describe_corrupt` turns the files that fail
into one paragraph that names them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Transparent pixels are composited onto white: what a viewer shows, and what product photos are shot on.
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class TooManyPixelsError(ValueError):
    """An image whose header declares more pixels than allowed: refused before its pixels are decoded."""


def is_image_file(path: Path) -> bool:
    """An image by its extension, excluding hidden files (macOS ``._name.jpg`` resource forks are not images)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale as 8-bit ``L``, scaled rather than clipped.

    ``convert("L")`` clips 16-bit values at 255, so a 16-bit PNG comes out nearly white; here 65535 maps to
    255. Mode ``I`` (older Pillow's 16-bit PNGs, 32-bit TIFFs) is read as 16-bit when its values exceed 255
    and fit 16 bits, and scaled by its maximum beyond that; float images are taken as 0..1 when they fit.
    """
    arr = np.asarray(img, dtype=np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode in _SIXTEEN_BIT:
        scale = 255.0 / 65535.0
    elif img.mode == "F":
        scale = 255.0 if top <= 1.0 else (255.0 / top if top > 255 else 1.0)
    else:  # "I"
        scale = 1.0 if top <= 255 else (255.0 / 65535.0 if top <= 65535 else 255.0 / top)
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL image as upright 8-bit RGB.

    Args:
        img: an opened image in any mode (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGBA``, ``CMYK``, ``YCbCr``,
            ``I;16``, ``I``, ``F``, ...), possibly carrying an EXIF orientation.
        background: colour transparent pixels are composited onto.

    Returns:
        An ``RGB`` image of the displayed orientation (EXIF rotation applied, so width and height may swap).
    """
    img = ImageOps.exif_transpose(img) or img
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        img = _grey_to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        img = canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def read_rgb(path: Path, size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` as upright 8-bit RGB, fully decoded (a truncated file raises here, not later).

    Args:
        path: an image file.
        size: bring it to ``size x size`` the way the eval transform does: shorter side to ``size``, centre
            square kept (any aspect ratio, down to 1 px, works).
        max_pixels: refuse (:class:`TooManyPixelsError`) an image whose header declares more pixels, before
            decoding them: a 20000 x 20000 PNG is a few kB on disk and 1.2 GB in memory. ``None``: no cap
            beyond Pillow's own decompression-bomb limit.

    Returns:
        The RGB image.
    """
    with Image.open(path) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise TooManyPixelsError(
                f"{img.width}x{img.height} is {img.width * img.height / 1e6:.0f} MP, over the "
                f"{max_pixels / 1e6:g} MP cap"
            )
        img.load()
        rgb = to_rgb(img)
    if size is not None and rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR)
    return rgb


def failure_reason(err: BaseException) -> str:
    """A decoding failure as one short line: ``Type: first line of the message``."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:120] if text else 'unreadable'}"


def decode_error(path: Path, max_pixels: int | None = None) -> str | None:
    """Why ``path`` cannot be used as an image (the decoder's one-line message), or ``None`` when it can."""
    try:
        read_rgb(path, max_pixels=max_pixels)
    except Exception as err:
        return failure_reason(err)
    return None


def describe_corrupt(bad: Mapping[Path, str], shown: int = 5) -> str:
    """One paragraph naming the first ``shown`` unreadable files and their errors, and the two ways out."""
    first = "; ".join(f"{path} ({why})" for path, why in list(bad.items())[:shown])
    more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
    return (
        f"{len(bad)} image file(s) could not be decoded: {first}{more}. Delete or replace them, or pass "
        f"data.skip_corrupt=true to leave them out (their number is logged and written to summary.json)."
    )


def discard_cache(path: Path, problem: str) -> None:
    """Remove a cache file that cannot be used, with one warning line: a cache is never fatal, it is rebuilt."""
    log.warning("discarding cache %s (%s); it is rebuilt", path, problem)
    with contextlib.suppress(OSError):  # a read-only cache folder: the rebuilt file is not written either
        path.unlink(missing_ok=True)


def _array_problem(images: np.ndarray, count: int, size: int | None) -> str | None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        return f"holds a {images.dtype} array of shape {images.shape}, not (N, H, W, 3) uint8"
    if images.shape[0] != count:
        return f"holds {images.shape[0]} images for {count} files"
    if size is not None and images.shape[1:3] != (size, size):
        return f"holds {images.shape[1]}x{images.shape[2]} images, not {size}x{size}"
    return None


def read_cached_images(path: Path, count: int, size: int | None = None) -> np.ndarray | None:
    """A decode cache's array, or ``None`` (file discarded, one warning) when it cannot be read or is not one.

    Loaded with ``allow_pickle=False``: a cache file never runs code, whoever wrote it.

    Args:
        path: the ``.npy`` file.
        count: how many images it must hold (one per file, in order).
        size: their side when the decode resized them, else ``None`` (any size).

    Returns:
        The ``(count, H, W, 3)`` uint8 array, or ``None``.
    """
    try:
        images = np.load(path, allow_pickle=False)
        problem = _array_problem(images, count, size) if isinstance(images, np.ndarray) else "not one array"
    except Exception as err:  # truncated, random bytes, a pickle, an .npz: all mean "decode again"
        problem = failure_reason(err)
    if problem is None:
        return images
    discard_cache(path, problem)
    return None


def read_cached_reasons(path: Path, count: int) -> dict[int, str] | None:
    """A cached ``{row: reason}`` record of undecodable files, or ``None`` (discarded, one warning) when invalid.

    Args:
        path: the JSON file.
        count: the number of files; every row must index one of them.

    Returns:
        The record, or ``None``.
    """
    try:
        raw = json.loads(path.read_text())
        bad = {int(k): v for k, v in raw.items()}
        valid = all(0 <= k < count and isinstance(v, str) for k, v in bad.items())
        problem = None if valid else f"rows or reasons that do not fit {count} files"
    except Exception as err:  # not JSON, not a mapping, keys that are not row numbers
        problem, bad = failure_reason(err), {}
    if problem is None:
        return bad
    discard_cache(path, problem)
    return None
