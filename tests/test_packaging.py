"""The config ships inside the package: a wheel installed outside the checkout composes ``transfer.run``'s config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import transfer
from transfer.conf import CONF_DIR

CHECKOUT = Path(__file__).resolve().parents[1]


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            *args,
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_editable_install_reads_the_top_level_conf():
    # Editing conf/ in the checkout takes effect at once: the installed transfer.conf is that folder.
    assert Path(CONF_DIR) == CHECKOUT / "conf"
    assert Path(transfer.__file__).parent == CHECKOUT / "transfer"


# pip builds and installs a wheel, then a child process imports it (~18 s): -m slow, as CI runs it; the editable
# install's test above and tests/test_cli.py compose the same packaged config in the default suite.
@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_composes_the_run_config(tmp_path: Path):
    # Build from a copy: the build writes build/ and *.egg-info beside its sources, which must not touch the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("transfer", "conf"):
        shutil.copytree(CHECKOUT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, src / name)
    _pip("wheel", "--wheel-dir", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("transfer-*.whl")

    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(CHECKOUT).as_posix() for p in (CHECKOUT / "transfer").rglob("*.py")}
    expected |= {
        "transfer/conf/" + p.relative_to(CHECKOUT / "conf").as_posix()
        for p in (CHECKOUT / "conf").rglob("*")
        if p.suffix in (".yaml", ".py")
    }
    missing = sorted(expected - shipped)
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages): {missing[:5]}"

    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the source copy is on the path from here
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HYDRA_FULL_ERROR": "1"}

    def python(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where = python("-c", "import transfer, transfer.conf; print(transfer.__file__); print(transfer.conf.__file__)")
    assert where.split() == [str(site / "transfer" / "__init__.py"), str(site / "transfer" / "conf" / "__init__.py")]
    cfg = yaml.safe_load(python("-m", "transfer.run", "--cfg", "job", "model=resnet18", "optimizer.lr=0.123"))
    assert cfg["model"]["name"] == "resnet18" and cfg["optimizer"]["lr"] == 0.123
    assert {"data", "finetune", "scheduler", "trainer", "callbacks", "logger"} <= set(cfg)
    assert list(elsewhere.iterdir()) == []  # --cfg job only prints
