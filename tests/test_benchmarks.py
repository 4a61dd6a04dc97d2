from __future__ import annotations

import sys
from pathlib import Path

import pytest

from transfer.benchmarks.__main__ import ensure_data, markdown, run_json, table


def _rows(key: str, values: list[float], mem: float = 100.0, **extra) -> list[dict]:
    return [{key: v, "peak_rss_mb": mem, **extra} for v in values]


def results(bf16: bool = True) -> dict:
    out = {
        "augment_ours": _rows("batches_per_s", [700, 800, 900], 1000),
        "augment_seed": _rows("batches_per_s", [30, 40, 50], 900),
        "train_seed": _rows("images_per_s", [300, 320, 340], 990),
        "train_ours": _rows("images_per_s", [400, 410, 420], 1300),
        "train_raw": _rows("images_per_s", [420, 430, 440], 1290),
        "frozen_uncached": _rows("epoch_s", [10.0], images=6400, val_acc=0.40, setup_s=0.0),
        "frozen_uncached_bn_frozen": _rows("epoch_s", [10.0], images=6400, val_acc=0.60, setup_s=0.0),
        "frozen_cached": _rows("epoch_s", [0.5], images=6400, val_acc=0.62, setup_s=12.0),
    }
    if bf16:
        out["train_ours_bf16"] = _rows("images_per_s", [480, 500, 520], 1280)
    return out


def test_table_reports_median_ratios_against_the_references():
    rows = {r[0]: r for r in table(results(), None)}
    assert rows["1 augmented batches/s (64 imgs)"][3] == "20.0x"  # 800 / 40, medians
    assert rows["2 train img/s resnet18 32px fp32"][3] == "1.28x"  # 410 / 320
    assert rows["2 train img/s, ours bf16-mixed"][3] == "1.56x"
    assert rows["2 Lightning overhead vs raw loop"][3] == "+4.9%"  # 430 / 410 - 1
    frozen = rows["3 frozen epoch s (6400 imgs, lite0)"]
    assert frozen[3] == "20x" and "0.600 bn=frozen" in frozen[2] and "+12.0 once" in frozen[1]
    assert "not run" in rows["4 time to 90% test acc, lite0, cold"][1]
    assert len(table(results(bf16=False), None)) == len(rows) - 1


def test_time_to_accuracy_row_says_whether_the_target_was_reached():
    tta = {"wall_s": 1800.0, "test_acc": 0.8512, "peak_rss_mb": 2000.0}
    row = table(results(), tta)[-1]
    assert row[1] == "30.0 min -> 0.8512" and row[3] == "not reached"
    assert table(results(), {**tta, "test_acc": 0.91})[-1][3] == "reached"
    text = markdown(table(results(), tta), "Machine: test")
    assert text.startswith("Machine: test") and text.count("\n| ") == 7


def test_run_json_reads_the_last_json_line_and_peak_memory():
    out = run_json([sys.executable, "-c", "print('noise'); print('{\"images_per_s\": 12.5}')"])
    assert out["images_per_s"] == 12.5 and out["peak_rss_mb"] > 1
    with pytest.raises(SystemExit, match="failed"):
        run_json([sys.executable, "-c", "raise SystemExit(3)"])


def test_missing_data_names_both_places_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import transfer.benchmarks.__main__ as bench

    monkeypatch.setattr(bench, "REPO", tmp_path / "repo")
    with pytest.raises(SystemExit, match="--data DIR"):
        ensure_data(tmp_path / "nothing")
    (tmp_path / "ok" / "train").mkdir(parents=True)
    assert ensure_data(tmp_path / "ok") == tmp_path / "ok"
