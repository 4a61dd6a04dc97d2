from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, make_image_folder
from tests.in_process import run_tool
from transfer.benchmarks.__main__ import ensure_data, markdown, run_json, table
from transfer.benchmarks.budget_race import budget_commands, budget_race, budget_table, parse_budgets, parse_seeds
from transfer.benchmarks.race import (
    CPU_SCALE,
    GPU_SCALE,
    TIMELINE,
    accuracy_at,
    race_scale,
    race_table,
    run_timeline,
    time_to,
)
from transfer.core.errors import ConfigError


def _rows(key: str, values: list[float], mem: float = 100.0, **extra) -> list[dict]:
    return [{key: v, "peak_rss_mb": mem, **extra} for v in values]


def results(bf16: bool = True) -> dict:
    out = {
        "augment_ours": _rows("batches_per_s", [700, 800, 900], 1000),
        "augment_seed": _rows("batches_per_s", [30, 40, 50], 900),
        "train_seed": _rows("images_per_s", [300, 320, 340], 990),
        "train_ours": _rows("images_per_s", [400, 410, 420], 1300, flops_per_image=1.1e9),
        "train_raw": _rows("images_per_s", [420, 430, 440], 1290),
        "train_recipe_ours": _rows("images_per_s", [190, 200, 180], 1500, precision="32-true"),
        "train_recipe_raw": _rows("images_per_s", [205, 210, 215], 1400, precision="32-true"),
        "peak_fp32": _rows("flops_per_s", [1.0e12, 1.2e12, 1.1e12], 200),
        "frozen_uncached": _rows("epoch_s", [10.0], images=6400, val_acc=0.40, setup_s=0.0),
        "frozen_uncached_bn_frozen": _rows("epoch_s", [10.0], images=6400, val_acc=0.60, setup_s=0.0),
        "frozen_cached": _rows("epoch_s", [0.5], images=6400, val_acc=0.62, setup_s=12.0),
    }
    if bf16:
        out["train_ours_bf16"] = _rows("images_per_s", [480, 500, 520], 1280, flops_per_image=1.1e9)
        out["peak_bf16"] = _rows("flops_per_s", [2.2e12, 2.0e12, 2.4e12], 300)
    return out


def test_table_reports_median_ratios_against_the_references():
    rows = {r[0]: r for r in table(results())}
    assert rows["1 augmented batches/s (64 imgs)"][3] == "20.0x"  # 800 / 40, medians
    assert rows["2 train img/s resnet18 32px fp32"][3] == "1.28x"  # 410 / 320
    assert rows["2 train img/s, ours bf16-mixed"][3] == "1.56x"
    assert rows["2 Lightning overhead vs raw loop"][3] == "+4.9%"  # 430 / 410 - 1
    assert rows["2 recipe step, framework + EMA/guard vs raw (32-true)"][1:4] == ["190", "210 (raw step)", "+10.5%"]
    frozen = rows["3 frozen epoch s (6400 imgs, lite0)"]
    assert frozen[3] == "20x" and "0.600 bn=frozen" in frozen[2] and "+12.0 once" in frozen[1]
    fp32, bf16 = rows["2 share of the measured peak, fp32"], rows["2 share of the measured peak, bf16"]
    assert fp32[1:4] == ["451 GFLOP/s", "1100 GFLOP/s (fp32 matmul)", "41.0%"]  # 410 img/s x 1.1 GFLOP, medians
    assert bf16[3] == "25.0%" and fp32[5] == "1300 / 200"  # 500 x 1.1 GFLOP / 2.2 TFLOP/s
    assert len(table(results(bf16=False))) == len(rows) - 2
    text = markdown(table(results()), "Machine: test")
    assert text.startswith("Machine: test") and text.count("\n| ") == 9


def test_race_reads_accuracy_at_each_time_point_and_time_to_each_threshold():
    rows = [
        {"epoch": 1, "seconds": 100.0, "test_acc": 0.80},
        {"epoch": 2, "seconds": 230.0, "test_acc": 0.86},
        {"epoch": 3, "seconds": 500.0, "test_acc": 0.905},
    ]
    assert accuracy_at(rows, 1) is None and accuracy_at(rows, 2) == 0.80 and accuracy_at(rows, 4) == 0.86
    assert accuracy_at(rows, 15) == 0.905
    assert time_to(rows, 0.85) == pytest.approx(230 / 60) and time_to(rows, 0.95) is None
    text = race_table({"cifar10": {"ours": {"rows": rows}, "plain": {"rows": []}}})
    ours, plain = text.splitlines()[2:]
    assert "| 80.00% | 86.00% | 86.00% | 90.50% |" in ours and "| 3.8 min | 8.3 min | 8.3 min |" in ours
    assert "failed" in plain


def test_on_a_gpu_the_race_reads_seconds_and_the_high_thresholds_under_airbench_named_as_published():
    rows = [
        {"epoch": 1, "seconds": 20.0, "test_acc": 0.93},
        {"epoch": 2, "seconds": 45.0, "test_acc": 0.955},
        {"epoch": 3, "seconds": 170.0, "test_acc": 0.972},
    ]
    assert race_scale(gpu=True) is GPU_SCALE and race_scale(gpu=False) is CPU_SCALE
    text = race_table({"cifar10": {"ours": {"rows": rows}}}, GPU_SCALE)
    reference, _, head, _, ours = text.splitlines()
    assert reference.startswith("Published, not run here: airbench") and "A100" in reference
    assert "| acc @30 s | acc @1 min | acc @3 min | to 94% | to 96% | to 97% |" in head
    assert "| 93.00% | 95.50% | 97.20% | 45.0 s | 2.8 min | 2.8 min |" in ours
    assert "airbench" not in race_table({"cifar10": {"ours": {"rows": rows}}}, CPU_SCALE)


def test_run_timeline_charges_neither_side_for_its_test_evaluations():
    script = (
        "import json, time; time.sleep(0.3); "
        "print(json.dumps({'timeline': 1, 'unix_time': time.time(), 'eval_seconds': 0.2, 'test_acc': 0.5}))"
    )
    out = run_timeline([sys.executable, "-c", script], "test")
    (row,) = out["rows"]
    assert out["exit_code"] == 0 and row["test_acc"] == 0.5
    assert 0.0 <= row["seconds"] < out["wall_s"] - 0.15  # 0.2 s of evaluation taken off the wall time


def test_run_json_reads_the_last_json_line_and_peak_memory():
    out = run_json([sys.executable, "-c", "print('noise'); print('{\"images_per_s\": 12.5}')"])
    assert out["images_per_s"] == 12.5 and out["peak_rss_mb"] > 1
    with pytest.raises(SystemExit, match="failed"):
        run_json([sys.executable, "-c", "raise SystemExit(3)"])


def test_missing_data_names_the_settings_and_an_archive_is_extracted(tmp_path: Path):
    import tarfile

    with pytest.raises(ConfigError, match=r"data_root=.*archive= is not set"):
        ensure_data(tmp_path / "nothing", None)
    with pytest.raises(ConfigError, match=r"clothing_archive=.* is no file"):
        ensure_data(tmp_path / "nothing", tmp_path / "none.tar.gz", "clothing_root", "clothing_archive")
    (tmp_path / "ok" / "train").mkdir(parents=True)
    assert ensure_data(tmp_path / "ok", None) == tmp_path / "ok"
    # an archive with its folders one level down (as clothing-10's is) lands in data_root itself
    made = make_image_folder(tmp_path / "src" / "set", {"train": 1, "test": 1})
    with tarfile.open(tmp_path / "set.tar.gz", "w:gz") as tar:
        tar.add(made, arcname="set")
    got = ensure_data(tmp_path / "cache" / "mine", tmp_path / "set.tar.gz")
    assert sorted(p.name for p in got.iterdir()) == ["test", "train"] and len(list(got.rglob("*.png"))) == 6
    assert [p.name for p in got.parent.iterdir()] == ["mine"]  # the staging folder is gone


def test_benchmarks_refuse_a_missing_setting_before_running_anything(tmp_path: Path):
    data = make_image_folder(tmp_path / "cifar", {"train": 1})
    no_seed = run_tool("transfer.benchmarks.__main__", f"data_root={data}")
    assert no_seed.returncode == 2 and "seed_loop= is not set" in no_seed.stderr and "Traceback" not in no_seed.stderr
    (tmp_path / "seed_loop.py").write_text("")
    no_data = run_tool(
        "transfer.benchmarks.__main__", f"data_root={tmp_path / 'x'}", f"seed_loop={tmp_path / 'seed_loop.py'}"
    )
    assert no_data.returncode == 2 and "data_root=" in no_data.stderr and "archive=" in no_data.stderr
    no_clothing = run_tool(
        "transfer.benchmarks.__main__",
        f"data_root={data}",
        "skip_speed=true",
        "time_to_accuracy=true",
        f"clothing_root={tmp_path / 'clothing'}",
    )
    assert no_clothing.returncode == 2 and "clothing_root=" in no_clothing.stderr
    assert "clothing_archive= is not set" in no_clothing.stderr
    assert not (tmp_path / "outputs").exists()


def test_without_cifar10_only_the_race_at_budgets_runs_and_it_races_the_photos_alone(tmp_path: Path):
    clothing = make_image_folder(tmp_path / "clothing", {"train": 1})
    assert list(budget_commands(None, clothing, tmp_path / "out", 4)) == ["clothing-10"]
    base = ("data_root=null", f"clothing_root={clothing}", "skip_speed=true", "time_to_accuracy=true")
    by_epochs = run_tool("transfer.benchmarks.__main__", *base)
    at_budgets = run_tool("transfer.benchmarks.__main__", *base, "budgets=[0]")
    for refused in (by_epochs, at_budgets):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "data_root= is not set" in by_epochs.stderr and "races" in by_epochs.stderr
    assert "budgets=" in at_budgets.stderr and "data_root" not in at_budgets.stderr  # past the data check
    assert not (tmp_path / "outputs").exists()


def test_nothing_in_the_package_assumes_a_checkout_beside_shared_data():
    import transfer

    package = Path(transfer.__file__).parent
    assert not [p for p in package.rglob("*.py") if "../shared" in p.read_text() or '"shared"' in p.read_text()]


@pytest.mark.slow  # two child processes; the timeline parsing and the race table are tested above without them
def test_plain_loop_and_the_framework_print_one_timeline_row_per_epoch(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 4})
    plain = run_timeline(
        [
            sys.executable,
            "-m",
            "transfer.benchmarks.plain_loop",
            "--data",
            str(root),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--size",
            "32",
        ],
        "plain",
    )
    ours = run_timeline(
        [
            sys.executable,
            "-m",
            "transfer.run",
            "model=lenet5",
            f"data.root={root}",
            f"hydra.run.dir={tmp_path / 'run'}",
            *TINY,
            TIMELINE,
        ],
        "ours",
    )
    for out in (plain, ours):
        assert out["exit_code"] == 0 and [r["epoch"] for r in out["rows"]] == [1, 2]
        # accuracy over the 12 test images (a whole number of them); training time (the test's time taken out) never
        # runs backwards, but an epoch of 8 images can take under the 0.1 s the timeline rounds to
        assert all(abs(r["test_acc"] * 12 - round(r["test_acc"] * 12)) < 1e-4 for r in out["rows"])
        assert 0 < out["rows"][0]["seconds"] <= out["rows"][1]["seconds"]


def _race_at_budgets(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m transfer.benchmarks`` racing at budgets on a one-image folder, in this process."""
    root = make_image_folder(tmp_path / "cifar", {"train": 1})
    args = ("skip_speed=true", "time_to_accuracy=true", "clothing_root=null", *overrides)
    return run_tool("transfer.benchmarks.__main__", f"data_root={root}", *args)


def test_budgets_are_positive_minutes_and_the_table_gives_both_sides_per_budget(tmp_path: Path):
    assert parse_budgets([2, 4, 8, 15]) == [2, 4, 8, 15] and parse_budgets(0.5) == [0.5]
    for bad in ([], [2, -1], ["2m"], True):
        with pytest.raises(ConfigError, match=r"budgets=.*minutes"):
            parse_budgets(bad)
    side = {"wall_s": 123.0, "test_acc": 0.8512}
    text = budget_table([{"data": "cifar10", "minutes": 2, "ours": side, "plain": {**side, "test_acc": None}}])
    assert "| cifar10 | 2 min | 85.12% | 2.05 min | failed | 2.05 min |" in text.splitlines()[2]
    refused = _race_at_budgets(tmp_path, "budgets=[2,0]")
    assert refused.returncode == 2 and "budgets=" in refused.stderr and not (tmp_path / "outputs").exists()


def test_with_seeds_each_side_runs_once_per_seed_and_the_table_gives_its_mean_and_spread(tmp_path: Path):
    assert parse_seeds(None) == [None] and parse_seeds([0, 1, 2]) == [0, 1, 2] and parse_seeds(3) == [3]
    for bad in ([], [1, 1], [0.5], ["0"], True):
        with pytest.raises(ConfigError, match=r"seeds=.*distinct integer"):
            parse_seeds(bad)
    seeded = budget_commands(tmp_path / "c", tmp_path / "p", tmp_path / "out", 4, seed=7)
    for data in ("cifar10", "clothing-10"):
        ours, plain = seeded[data]["ours"], seeded[data]["plain"]
        assert "seed=7" in ours and plain[plain.index("--seed") + 1] == "7"
        assert any(a.startswith("hydra.run.dir=") and a.endswith("-4min-seed7") for a in ours)
    unseeded = budget_commands(tmp_path / "c", None, tmp_path / "out", 4)["cifar10"]
    assert not any(a.startswith("seed=") for a in unseeded["ours"]) and "--seed" not in unseeded["plain"]

    def row(seed: int, ours: float | None, plain: float) -> dict:
        return {
            "data": "clothing-10",
            "minutes": 4,
            "seed": seed,
            "ours": {"wall_s": 240.0, "test_acc": ours},
            "plain": {"wall_s": 252.0 + seed * 6, "test_acc": plain},
        }

    text = budget_table([row(0, 0.90, 0.91), row(1, 0.92, 0.92), row(2, 0.94, 0.93)])
    assert text.splitlines()[2:] == [
        "| clothing-10 | 4 min | 92.00 ± 2.00% (n=3) | 4.00 min | 92.00 ± 1.00% (n=3) | 4.30 min |"
    ]
    failed = budget_table([row(0, 0.90, 0.91), row(1, None, 0.92)]).splitlines()[2]
    assert "| 90.00 ± 0.00% (n=1), 1 failed |" in failed
    refused = _race_at_budgets(tmp_path, "budgets=[2]", "seeds=[1,1]")
    assert refused.returncode == 2 and "seeds=" in refused.stderr and not (tmp_path / "outputs").exists()


@pytest.mark.slow  # two child processes with 1 min budgets (start-up and imports count against them)
def test_the_race_at_a_budget_runs_both_sides_to_it_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 4})
    monkeypatch.chdir(tmp_path)
    ours_extra = ["model=lenet5", *TINY]
    result = budget_race(root, None, [1], ours_extra, ["--batch-size", "8", "--size", "32"])
    (row,) = result["results"]
    for side in ("ours", "plain"):
        run = row[side]
        assert run["exit_code"] == 0, run["stderr"]
        assert abs(run["test_acc"] * 12 - round(run["test_acc"] * 12)) < 1e-4  # accuracy over the 12 test images
        assert run["plan"]["planned_steps"] >= 20 and run["plan"]["budget_s"] == 60
    # Ours plans to the 60 s. This checks that it ran to a plan, not how close it came: on 2 shared cores a child's
    # start-up alone varied by tens of seconds (90.4 s seen in CI); the +-5% target is the benchmark's to measure.
    assert 30 < row["ours"]["wall_s"] < 120 and row["ours"]["plan"]["planned_steps"] > 20
    assert len(list((tmp_path / "outputs" / "benchmarks").glob("race-budgets-*.md"))) == 1
