"""Text from files is inert where it is written: CSV cells are no formulas, Markdown cells no markup or HTML."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from transfer.core.escape import csv_cell, csv_record, csv_row, markdown, markdown_code

FORMULA = "=cmd|' /C calc'!A0"
HTML = "<img src=x onerror=alert(1)>"


@pytest.mark.parametrize("text", [FORMULA, "+1+1", "-2", "@SUM(A1:A9)", "\tx", "\rx"])
def test_cells_a_spreadsheet_would_evaluate_get_a_quote(text: str):
    assert csv_cell(text) == "'" + text


def test_other_cells_are_unchanged_and_numbers_stay_numbers():
    assert csv_row(["cat", "a=b", 0.5, -1, None]) == ["cat", "a=b", 0.5, -1, None]
    assert csv_record({"name": "@x", "n": 3}) == {"name": "'@x", "n": 3}


def test_markdown_escapes_pipes_backticks_headings_and_html():
    out = markdown(f"# a|b `c` {HTML}\nnext")
    assert out == "\\# a\\|b \\`c\\` &lt;img src=x onerror=alert(1)&gt; next"
    assert "<" not in out and "\n" not in out
    assert markdown("resnet18 lr=1e-3") == "resnet18 lr=1e-3"  # ordinary text reads as it did


def test_markdown_code_cannot_be_closed_early():
    span = markdown_code("a ``b`` c|d")
    assert span.startswith("```") and span.endswith("```") and "\\|" in span
    assert markdown_code("x") == "`x`"


def _job(root: Path, name: str, overrides: list[str], model: str) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))  # YAML reads a JSON list
    summary = {"model": model, "pretrained": True, "adapt": "native", "seed": 1, "best_val_acc": 0.5, "test_acc": 0.5}
    (job / "summary.json").write_text(json.dumps(summary))


def test_sweep_report_escapes_hostile_overrides_models_and_reasons(tmp_path: Path):
    from transfer.experiments.report import write_report

    _job(tmp_path, "0", ["data.root=/d", "+tag=1"], f"{HTML}|net")  # Hydra's + and ~ overrides start a formula
    _job(tmp_path, "1", ["data.root=/d", "~tag"], FORMULA)
    failed = tmp_path / "2"
    failed.mkdir()
    (failed / "failed.json").write_text(json.dumps({"reason": f"-boom | {HTML}", "overrides": ["data.root=/d"]}))
    md = write_report(tmp_path).read_text()
    with open(tmp_path / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cells = [v for r in rows for v in r.values() if v]
    assert all(not c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)
    assert {"'+tag=1", "'" + FORMULA, "'-boom | " + HTML, "~tag"} <= set(cells)
    assert "<img" not in md and "| &lt;img src=x onerror=alert(1)&gt;\\|net |" in md
    table = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert table.count(" | ") == len(rows[0]) - 3  # the hostile pipe did not add a column (no status/reason)


def test_evaluate_report_escapes_class_names():
    from transfer.deploy.evaluate import report_markdown

    per_class = {name: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for name in ("a|b", HTML, "#h")}
    md = report_markdown({"accuracy": 1.0, "n": 3, "loss": 0.0, "macro_f1": 1.0, "per_class": per_class}, "t <b>")
    assert "| a\\|b |" in md and "<img" not in md and "| \\#h |" in md and md.startswith("# t &lt;b&gt;")
