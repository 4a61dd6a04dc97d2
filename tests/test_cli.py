"""One command-line convention: every ``python -m transfer.<tool>`` is a Hydra app over ``conf/<tool>.yaml``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from transfer.conf import CONF_DIR, CONF_PATH

PACKAGE = Path(__file__).resolve().parents[1] / "transfer"
# The tools that keep no run directory: only what they write themselves may appear.
QUIET = ("predict", "report", "models", "benchmarks", "hparams_search", "export", "serve")
# The command-line tools that are nothing but a tool: no other module may import them.
TOOLS = ("run", "predict", "evaluate", "residuals", "export", "serve", "lr_find")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _hydra_mains() -> dict[str, ast.Call]:
    """``{module: its @hydra.main(...) call}`` for every module of the package with a ``main``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                calls = [
                    d for d in node.decorator_list if isinstance(d, ast.Call) and ast.unparse(d.func) == "hydra.main"
                ]
                found[_module(path)] = calls[0] if calls else None
    return found


def test_every_tool_is_a_hydra_app_over_the_packaged_config():
    mains = _hydra_mains()
    # The benchmark's helpers run as its child processes (transfer.benchmarks.measure ...), not as user tools.
    user_tools = {m for m in mains if not m.startswith("transfer.benchmarks.") or m == "transfer.benchmarks.__main__"}
    assert {
        "transfer.run",
        "transfer.predict",
        "transfer.report",
        "transfer.models.__main__",
        "transfer.benchmarks.__main__",
        "transfer.hparams_search",
    } <= user_tools
    for module in sorted(user_tools):
        call = mains[module]
        assert call is not None, f"{module}.main is not a Hydra app"
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kwargs["config_path"] == "CONF_PATH", module  # the one packaged location, never a path of its own
        assert (Path(CONF_DIR) / f"{ast.literal_eval(kwargs['config_name'])}.yaml").is_file(), module


@pytest.mark.parametrize("tool", QUIET)
def test_tools_without_outputs_of_their_own_create_no_hydra_directories_or_logs(tool: str):
    with initialize_config_module(CONF_PATH.removeprefix("pkg://"), version_base="1.3"):
        cfg = compose(f"tools/{tool}", return_hydra_config=True)
    assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None
    assert OmegaConf.select(cfg, "hydra.job_logging.root") is None  # no handlers: no <job>.log file
    assert cfg.hydra.help.app_name == f"transfer.{tool}" and "Usage: python -m transfer." in cfg.hydra.help.header


def test_no_module_imports_a_command_line_tool():
    tools = {f"transfer.{t}" for t in TOOLS}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else ([a.name for a in node.names] if isinstance(node, ast.Import) else [])
            )
            for name in names:
                # benchmarks.measure times the exporter itself (its infer_ort row), so it imports the export code.
                allowed = me == "transfer.benchmarks.measure" and name == "transfer.export"
                assert name not in tools - {me} or allowed, f"{me} imports the tool {name}"


def _tool(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m module`` in an empty folder (``tmp_path/cwd``), so anything Hydra writes shows up."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def test_report_tool_takes_key_value_and_writes_only_the_report(tmp_path: Path):
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "summary.json").write_text(
        json.dumps(
            {"model": "lenet5", "pretrained": False, "adapt": "native", "seed": 1, "best_val_acc": 0.5, "test_acc": 0.4}
        )
    )
    proc = _tool(tmp_path, "transfer.report", f"sweep={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 0 |  | lenet5 |" in proc.stdout and (tmp_path / "sweep" / "report.csv").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []  # no outputs/, .hydra/ or report.log where it ran
    missing = _tool(tmp_path, "transfer.report")
    assert missing.returncode == 2 and "sweep= is required. Usage: python -m transfer.report sweep=" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_run_command_answers_help_and_bad_settings_before_importing_lightning(tmp_path: Path):
    """--help, --cfg job and the preflight's refusals must not wait ~10 s for Lightning, torch and the models."""
    probe = (
        "import sys, runpy; sys.argv = ['transfer.run', 'optimizer.lr=-1'];\n"
        "try: runpy.run_module('transfer.run', run_name='__main__')\n"
        "except SystemExit as e: print('exit', e.code, 'lightning' in sys.modules, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "optimizer.lr=-1 must be a positive number" in proc.stderr
    assert proc.stdout.split()[-4:] == ["exit", "2", "False", "False"]
