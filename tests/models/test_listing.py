from __future__ import annotations

import pytest
import torch

from tests.in_process import run_tool
from transfer.data import CIFAR10Data
from transfer.models import REGISTRY, model_preprocess, resolve_adapt
from transfer.models.__main__ import rows


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """The listing's rows with empty weight caches (building every model, even on the meta device, takes seconds)."""
    caches = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.hub, "get_dir", lambda: str(caches))
        patch.setenv("HF_HUB_CACHE", str(caches / "hf"))
        return rows()


def test_listing_covers_the_zoo_and_knows_what_is_offline(listed: list[dict[str, str]]):
    table = {r["name"]: r for r in listed}
    assert set(table) == set(REGISTRY)
    assert table["efficientnet_lite0"]["offline"] == "yes" and table["resnet18"]["offline"] == "no"
    assert table["lenet5"]["weights"] == "none (scratch)"
    assert table["resnet18"]["params"] == "11.7M" and table["vit_b_16"]["auto@32px"] == "resize"


def test_listing_adapt_columns_are_what_a_run_resolves(listed: list[dict[str, str]], compose_cfg):
    """auto at 32 px and in the CIFAR-10 run as composed, from the functions the run calls, for every model."""
    data = compose_cfg("data=cifar10").data
    image_size, native = data.image_size, CIFAR10Data.native_size
    for row in listed:
        name = row["name"]
        assert row["auto@32px"] == resolve_adapt(name, "auto", 32, native), name
        mode, size = row["auto@cifar10"].split("@")
        assert mode == resolve_adapt(name, "auto", image_size, native), name
        assert int(size.removesuffix("px")) == model_preprocess(name, mode, image_size, native).image_size, name
        assert float(row["crop_pct"]) == pytest.approx(REGISTRY[name].pretrained_cfg.crop_pct, abs=5e-4), name
    # the default model on the default data: the unmodified network fed CIFAR upsampled to its small-input size
    lite0 = next(r for r in listed if r["name"] == "efficientnet_lite0")
    assert lite0["auto@32px"] == "native" and lite0["auto@cifar10"] == "resize@64px"


def test_listing_command_prints_a_table(listed: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch, compose_cfg):
    asked = []
    # the rows themselves are checked above; here, what the command hands them and prints
    monkeypatch.setattr("transfer.models.__main__.rows", lambda cifar10: asked.append(cifar10) or listed)
    out = run_tool("transfer.models.__main__")  # python -m transfer.models, in this process
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "params"] and len(lines) == 1 + len(REGISTRY)
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(REGISTRY)
    # inside its own Hydra app the command composes the run's config for the CIFAR-10 input, as a test does outside
    assert asked == [(compose_cfg("data=cifar10").data.image_size, CIFAR10Data.native_size)]
