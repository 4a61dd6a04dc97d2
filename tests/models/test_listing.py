from __future__ import annotations

import pytest
import torch

from tests.in_process import run_tool
from transfer.models import REGISTRY
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
    assert table["resnet18"]["params"] == "11.7M" and table["vit_b_16"]["adapt@32px"] == "resize"


def test_listing_command_prints_a_table(listed: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("transfer.models.__main__.rows", lambda: listed)  # the rows themselves are checked above
    out = run_tool("transfer.models.__main__")  # python -m transfer.models, in this process
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "params"] and len(lines) == 1 + len(REGISTRY)
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(REGISTRY)
