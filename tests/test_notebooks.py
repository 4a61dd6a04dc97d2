"""The notebooks never rot: in the default suite, every name they import from ``transfer`` exists and every call
of one binds to its signature; with ``-m slow`` they run top to bottom, offline, on the small data they generate."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"walkthrough.ipynb", "residuals.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_imports_and_calls_fit_the_library(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(
        line
        for c in nb.cells
        if c.cell_type == "code"
        for line in c.source.splitlines()
        if not line.lstrip().startswith(("%", "!"))
    )  # IPython magics are not Python
    tree = ast.parse(code)
    library = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transfer"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{path.name}: {node.module} has no {alias.name}"
                library[alias.asname or alias.name] = getattr(module, alias.name)
    assert library, f"{path.name} uses nothing from transfer"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and callable(library.get(node.func.id)):
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue  # *args / **kwargs: nothing to check statically
            signature = inspect.signature(library[node.func.id])
            try:
                signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as err:
                raise AssertionError(f"{path.name} line {node.lineno}: {ast.unparse(node)}: {err}") from None


@pytest.mark.slow  # a Jupyter kernel each and real training: ~25 s per notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRANSFER_NOTEBOOK_DATA", raising=False)
    # The kernel spec runs "python": make that this interpreter even when the venv is not activated.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # The notebooks keep their data and runs in a mkdtemp folder for the reader to look at; here it goes in tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images  # the figures were drawn
