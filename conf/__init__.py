"""The configs of ``transfer``, installed as the package ``transfer.conf``.

This folder stays at the top of the checkout, where users look for it; ``pyproject.toml`` maps it into the
package (``package-dir``) and ships its YAML files as package data, so an editable install and a wheel both
find it the same way. This file is what makes the folder an importable package: Hydra's ``pkg://`` config
source only accepts a package with an ``__init__.py``.
"""

from __future__ import annotations

from pathlib import Path

# What every ``@hydra.main`` takes: the package, not a path, so it works wherever ``transfer`` is installed.
CONF_PATH = "pkg://transfer.conf"
# The same folder on disk, for Hydra's compose API (``initialize_config_dir``) and for reading one YAML file.
CONF_DIR = str(Path(__file__).resolve().parent)
