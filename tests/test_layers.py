"""The package's layers import one way: commands -> experiments -> deploy -> training -> models, data -> core.

Read from the source with :mod:`ast` (nothing is imported), so a new import that points up a layer fails here
with the file and line, whether it sits at the top of a module or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import transfer

PACKAGE = Path(transfer.__file__).parent
# Lowest first. A module may import its own package and any layer below it; two packages of one layer (models
# and data) never import each other. transfer.conf holds only the config path and may be imported from anywhere.
LAYERS: list[set[str]] = [{"core"}, {"models", "data"}, {"training"}, {"deploy"}, {"experiments"}, {"commands"}]
COMMANDS = {
    "run",
    "predict",
    "evaluate",
    "export",
    "serve",
    "lr_find",
    "residuals",
    "report",
    "hparams_search",
    "benchmarks",
    "__init__",
}


def layer_of(module: str) -> str | None:
    """The layer of a ``transfer`` module name (``transfer.training.module`` -> ``training``)."""
    parts = module.split(".")
    if parts[0] != "transfer" or len(parts) == 1:
        return None
    if parts[1] == "conf":
        return None
    return "commands" if parts[1] in COMMANDS else parts[1]


def rank(layer: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if layer in names)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every ``transfer`` module ``path`` imports, with the line, top-level or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "transfer"]


def violations(package: Path = PACKAGE) -> list[str]:
    """``file:line: a -> b`` for every import that points up a layer or sideways within one."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        me = layer_of(".".join(rel.parts))
        if me is None or me == "commands":
            continue
        for line, name in imports(path):
            other = layer_of(name)
            if other is None or other == me:
                continue
            if rank(other) >= rank(me):
                bad.append(f"{rel}.py:{line}: {me} -> {other} ({name})")
    return bad


def test_imports_point_down_the_layers() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "transfer"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "bad.py").write_text("def f():\n    from transfer.training.module import Classifier\n")
    (pkg / "data" / "fine.py").write_text("from transfer.core.errors import ConfigError\n")
    (pkg / "models").mkdir()
    (pkg / "models" / "side.py").write_text("import transfer.data.batch\n")
    assert violations(pkg) == [
        "transfer/data/bad.py:2: data -> training (transfer.training.module)",
        "transfer/models/side.py:1: models -> data (transfer.data.batch)",
    ]
