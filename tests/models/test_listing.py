from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfer.models import REGISTRY
from transfer.models.__main__ import rows


def test_listing_covers_the_zoo_and_knows_what_is_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    table = {r["name"]: r for r in rows()}
    assert set(table) == set(REGISTRY)
    assert table["efficientnet_lite0"]["offline"] == "yes" and table["resnet18"]["offline"] == "no"
    assert table["lenet5"]["weights"] == "none (scratch)"
    assert table["resnet18"]["params"] == "11.7M" and table["vit_b_16"]["adapt@32px"] == "resize"


def test_listing_command_prints_a_table():
    out = subprocess.run([sys.executable, "-m", "transfer.models"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "params"] and len(lines) == 1 + len(rows())
