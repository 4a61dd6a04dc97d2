"""Shared fixtures: tiny image folders made in tmp_path, tiny architectures registered per test, Hydra configs."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.helpers import TINY, make_image_folder, run
from tests.tiny_models import TINY_ARCHS, registered
from transfer.conf import CONF_DIR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu``-marked tests run where CUDA is available (they are not ``slow``, so the default run has them) and
    are skipped, with the reason shown by ``-rs``, everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    """A CIFAR-style tree: 3 classes, 12 train and 4 test images each, 32 px."""
    return make_image_folder(tmp_path / "tiny", {"train": 12, "test": 4})


@pytest.fixture
def tiny_models() -> Iterator[None]:
    """The tiny test architectures (``tiny_test_cnn``, ``tiny_test_neck``) in the model registry for one test; the
    registry is restored afterwards, so the production registry never lists them."""
    with registered(*TINY_ARCHS):
        yield


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose ``conf/config.yaml`` with overrides, as the command line would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never download (any attempt fails as it would offline) and never write caches outside tmp_path."""
    import urllib.error

    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "decode-cache"))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", refuse)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, list[str], Path]:
    """One real ``python -m transfer.run`` (packaged EfficientNet-Lite0 weights, tiny data), shared by the tests
    that read its outputs: ``(run_dir, completed process, its arguments, data root)``."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "tiny", {"train": 12, "test": 4})
    run_dir = tmp_path_factory.mktemp("runs") / "lite0"
    args = ["model=efficientnet_lite0", f"data.root={root}", f"hydra.run.dir={run_dir}", *TINY]
    return run_dir, run(*args), args, root
