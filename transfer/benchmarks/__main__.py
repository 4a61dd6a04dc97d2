"""Side-by-side speed benchmarks against a reference training script (the seed loop), one table of ratios.

    python -m transfer.benchmarks data_root=DIR [archive=FILE.tar.gz] seed_loop=PATH [repeats=3]
        [time_to_accuracy=true [skip_speed=true] [clothing_root=DIR] [clothing_archive=FILE.tar.gz]]

The package ships in a wheel, so every input is a setting: the CIFAR-10 image folders (``data_root``, extracted
from ``archive`` when missing), the seed loop script (``seed_loop``: its ``InMemoryImages`` dataset and its
``--data/--model/--steps/--batch-size`` command line), and for the race the clothing photos (``clothing_root``,
``clothing_archive``). A setting a chosen benchmark needs and does not have is refused before anything runs.

Every measurement runs in its own process (so its peak memory is its own), the configurations alternate
within each repeat (so a slow minute of the machine hits all of them), and the table shows medians:

1. augmented batches/s of 64: batched on-device augmentation vs the seed loop's per-image PIL pipeline;
2. end-to-end training images/s, the seed loop's ResNet-18 at 32 px, batch 64: ``Trainer.fit`` with this
   project's data path vs ``seed_loop.py`` (fp32, and bf16 autocast where the CPU has bf16), and Lightning's
   overhead against a plain loop over the same model, data and optimizer; and the share of the device's
   measured matmul peak that ours' training FLOP/s reach, per precision (:mod:`transfer.benchmarks.flops`);
3. seconds per frozen-backbone epoch (EfficientNet-Lite0, ImageNet weights): cached features vs not, with
   the head's validation accuracy for each;
4. peak resident memory of every measured process;
5. with ``time_to_accuracy=true`` (``skip_speed=true`` for it alone): the race of the default recipe against the
   plain loop on CIFAR-10 and on the clothing photos (:mod:`transfer.benchmarks.race`; tens of minutes on a CPU);
   with ``budgets=[2,4,8,15]`` as well, the race at those budgets in minutes instead: ``transfer.run budget=B``
   against the plain loop made budget-aware (:mod:`transfer.benchmarks.budget_race`); ``seeds=[0,1,2]`` runs
   each side once per seed and gives means ± std.
6. inference images/s of EfficientNet-Lite0 at 32 px, onnxruntime on the exported model against eager PyTorch,
   batch 1 and 64 (when onnxruntime is installed: the ``[export]`` extra).

Results also go to ``outputs/benchmarks/<time>.{md,json}``. The settings are ``conf/tools/benchmarks.yaml``
(``--help``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from transfer.benchmarks.budget_race import budget_race, parse_budgets, parse_seeds
from transfer.benchmarks.race import race
from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import ConfigError, report_errors


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run a command; return its exit code, its stdout and its peak resident memory (MB, from the
    kernel's accounting of that one child)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), usage.ru_maxrss / 1024


def run_json(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command that prints a JSON line last; add its peak resident memory (MB)."""
    code, stdout, rss = run_measured(args, env)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise SystemExit(f"benchmark step failed (exit {code}): {' '.join(args)}")
    return {**json.loads(lines[-1]), "peak_rss_mb": rss}


def measure(name: str, data: Path, *extra: str) -> list[str]:
    """The command line of one :mod:`transfer.benchmarks.measure` measurement."""
    return [sys.executable, "-m", "transfer.benchmarks.measure", name, "--data", str(data), *extra]


def ensure_data(data: Path, archive: Path | None, setting: str = "data_root", archive_setting: str = "archive") -> Path:
    """Image folders at ``data`` (``data/train/<class>/*``), extracted from ``archive`` when missing.

    Args:
        data: where the ``train/`` folder should be.
        archive: a tarball holding ``train/`` (and ``test/``) at its top or one folder down; ``None``: none.
        setting: the setting ``data`` came from, named in the error.
        archive_setting: the setting ``archive`` came from, named in the error.

    Returns:
        ``data``.

    Raises:
        ConfigError: no folders at ``data`` and no archive file to extract them from.
    """
    if (data / "train").is_dir():
        return data
    if archive is None or not archive.is_file():
        found = f"{archive_setting}={archive} is no file" if archive else f"{archive_setting}= is not set"
        raise ConfigError(
            f"No image folders at {setting}={data} (it needs {data / 'train'}/<class>/*) and {found}. Pass "
            f"{setting}=DIR holding train/ (and test/), or {archive_setting}=FILE.tar.gz with those folders "
            f"at its top or one folder down to extract into {setting}."
        )
    extract(archive, data)
    return data


def extract(archive: Path, data: Path) -> None:
    """Unpack ``archive`` into ``data``: the folder holding ``train/`` (its top or one level down) becomes ``data``.

    It is unpacked beside ``data`` first, so an interrupted extraction never leaves a half-filled ``data``.
    """
    print(f"extracting {archive} into {data} ...", flush=True)
    data.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data.name}-", dir=data.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        tops = [staging, *sorted(p for p in staging.iterdir() if p.is_dir())]
        top = next((p for p in tops if (p / "train").is_dir()), None)
        if top is None:
            raise ConfigError(f"{archive} holds no train/ folder at its top or one folder down; pass another archive.")
        data.mkdir(exist_ok=True)
        for child in top.iterdir():
            if not (data / child.name).exists():
                child.rename(data / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU runs bf16 matmuls natively (elsewhere bf16 autocast is emulated, slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def recipe_precision() -> str:
    """bf16-mixed where a default run trains in it (``trainer.precision=auto`` on a GPU with bf16), else fp32: the raw
    loop has no fp16 loss scaler, so an older GPU's 16-mixed is not compared."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def machine() -> str:
    """One line: CPU model and cores, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # no /proc (macOS) or no model name line: keep platform's
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def collect(data: Path, seed_loop: Path, repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run every configuration ``repeats`` times, interleaved; return their results by configuration."""
    seed = str(seed_loop)
    configs = {
        "augment_ours": measure("augment_ours", data),
        "augment_seed": measure("augment_seed", data, "--seed-loop", seed),
        "train_seed": [
            sys.executable,
            seed,
            "--data",
            str(data),
            "--model",
            "resnet18",
            "--steps",
            "50",
            "--batch-size",
            "64",
        ],
        "train_ours": measure("train_lightning", data),
        "train_raw": measure("train_raw", data),
        # the default recipe's step, in the precision a default run trains in on this device
        "train_recipe_ours": measure("train_lightning", data, "--recipe", "--precision", recipe_precision()),
        "train_recipe_raw": measure("train_raw", data, "--recipe", "--precision", recipe_precision()),
        "peak_fp32": measure("peak_matmul", data),
    }
    if cpu_has_bf16() or torch.cuda.is_available():
        configs["train_ours_bf16"] = measure("train_lightning", data, "--precision", "bf16-mixed")
        configs["peak_bf16"] = measure("peak_matmul", data, "--precision", "bf16-mixed")
    if importlib.util.find_spec("onnxruntime") is not None:
        configs["infer_ort"] = measure("infer_ort", data, "--repeats", "1")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    for r in range(repeats):
        for name, cmd in configs.items():
            results[name].append(run_json(cmd))
            print(f"  repeat {r + 1}/{repeats} {name}: {results[name][-1]}", flush=True)
    # once each: an epoch median over 3 epochs is already a repeat. Uncached with both BN policies, since the
    # cached phase keeps the pretrained BN statistics (bn=frozen) and sees un-augmented images.
    for key, extra in (
        ("frozen_uncached", []),
        ("frozen_uncached_bn_frozen", ["--bn", "frozen"]),
        ("frozen_cached", ["--cached"]),
    ):
        with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the extraction is part of the cost
            results[key] = [run_json(measure("frozen_epoch", data, *extra, "--cache", cache))]
            print(f"  {key}: {results[key][-1]}", flush=True)
    return results


def med(rows: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over repeats."""
    return statistics.median(r[key] for r in rows)


def table(results: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    """The rows: measurement, ours, reference, ratio, target, peak MB ours / reference."""

    def mem(a: str, b: str | None = None) -> str:
        return f"{med(results[a], 'peak_rss_mb'):.0f}" + (f" / {med(results[b], 'peak_rss_mb'):.0f}" if b else "")

    aug_o, aug_s = med(results["augment_ours"], "batches_per_s"), med(results["augment_seed"], "batches_per_s")
    tr_o, tr_s = med(results["train_ours"], "images_per_s"), med(results["train_seed"], "images_per_s")
    raw = med(results["train_raw"], "images_per_s")
    rows = [
        [
            "1 augmented batches/s (64 imgs)",
            f"{aug_o:.0f}",
            f"{aug_s:.1f} (seed PIL)",
            f"{aug_o / aug_s:.1f}x",
            ">= 20x",
            mem("augment_ours", "augment_seed"),
        ],
        [
            "2 train img/s resnet18 32px fp32",
            f"{tr_o:.0f}",
            f"{tr_s:.0f} (seed loop)",
            f"{tr_o / tr_s:.2f}x",
            ">= 1.5x",
            mem("train_ours", "train_seed"),
        ],
    ]
    if "train_ours_bf16" in results:
        bf = med(results["train_ours_bf16"], "images_per_s")
        rows.append(
            [
                "2 train img/s, ours bf16-mixed",
                f"{bf:.0f}",
                f"{tr_s:.0f} (seed loop, fp32)",
                f"{bf / tr_s:.2f}x",
                ">= 1.5x",
                mem("train_ours_bf16", "train_seed"),
            ]
        )
    rows.append(
        [
            "2 Lightning overhead vs raw loop",
            f"{tr_o:.0f}",
            f"{raw:.0f} (raw loop)",
            f"{(raw / tr_o - 1) * 100:+.1f}%",
            "<= 5%",
            mem("train_ours", "train_raw"),
        ]
    )
    if "train_recipe_ours" in results:
        ours, raw = med(results["train_recipe_ours"], "images_per_s"), med(results["train_recipe_raw"], "images_per_s")
        rows.append(
            [
                f"2 recipe step, framework + EMA/guard vs raw ({results['train_recipe_ours'][0]['precision']})",
                f"{ours:.0f}",
                f"{raw:.0f} (raw step)",
                f"{(raw / ours - 1) * 100:+.1f}%",
                "<= 5%",
                mem("train_recipe_ours", "train_recipe_raw"),
            ]
        )
    cached, plain = results["frozen_cached"][0], results["frozen_uncached"][0]
    frozen_bn = results["frozen_uncached_bn_frozen"][0]
    rows.append(
        [
            f"3 frozen epoch s ({plain['images']} imgs, lite0)",
            f"{cached['epoch_s']:.2f} (+{cached['setup_s']:.1f} once; val {cached['val_acc']:.3f})",
            f"{plain['epoch_s']:.2f} (val {plain['val_acc']:.3f} bn=train, {frozen_bn['val_acc']:.3f} bn=frozen)",
            f"{plain['epoch_s'] / cached['epoch_s']:.0f}x",
            ">= 20x",
            mem("frozen_cached", "frozen_uncached"),
        ]
    )
    return rows + peak_rows(results) + ort_rows(results)


def peak_rows(results: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    """Row 2's share of the device: ours' training FLOP/s against the measured matmul peak, per precision."""
    rows = []
    for train, peak, label in (("train_ours", "peak_fp32", "fp32"), ("train_ours_bf16", "peak_bf16", "bf16")):
        if train not in results or peak not in results:
            continue
        achieved = med(results[train], "images_per_s") * med(results[train], "flops_per_image")
        top = med(results[peak], "flops_per_s")
        rows.append(
            [
                f"2 share of the measured peak, {label}",
                f"{achieved / 1e9:.0f} GFLOP/s",
                f"{top / 1e9:.0f} GFLOP/s ({label} matmul)",
                f"{achieved / top:.1%}",
                "",
                f"{med(results[train], 'peak_rss_mb'):.0f} / {med(results[peak], 'peak_rss_mb'):.0f}",
            ]
        )
    return rows


def ort_rows(results: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    """Row 6, when measured: onnxruntime vs eager PyTorch inference images/s at batch 1 and 64."""
    if "infer_ort" not in results:
        return []
    rows = []
    for batch in (1, 64):
        ort, eager = med(results["infer_ort"], f"ort_b{batch}"), med(results["infer_ort"], f"eager_b{batch}")
        rows.append(
            [
                f"6 infer img/s lite0 32px, batch {batch}",
                f"{ort:.0f} (onnxruntime)",
                f"{eager:.0f} (eager)",
                f"{ort / eager:.2f}x",
                "",
                f"{med(results['infer_ort'], 'peak_rss_mb'):.0f}",
            ]
        )
    return rows


def markdown(rows: list[list[str]], header: str) -> str:
    head = ["measurement", "ours", "reference", "ratio", "target", "peak MB ours / ref"]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _path(value: Any) -> Path | None:
    return Path(str(value)).expanduser() if value else None


def inputs(cfg: DictConfig) -> tuple[Path | None, Path | None, Path | None]:
    """Check and prepare the inputs the chosen benchmarks need, before any of them runs.

    Returns:
        ``(cifar10 folders, seed loop or None when the speed benchmarks are skipped, clothing folders or None)``;
        the CIFAR-10 folders are ``None`` only for the race at budgets on the photos alone (``data_root=null``).

    Raises:
        ConfigError: naming the missing setting.
    """
    seed_loop = None
    if not cfg.skip_speed:
        seed_loop = _path(cfg.seed_loop)
        if seed_loop is None or not seed_loop.is_file():
            found = f"seed_loop={seed_loop} is no file" if seed_loop else "seed_loop= is not set"
            raise ConfigError(
                f"The speed benchmarks compare against the seed loop script and {found}. Pass seed_loop=PATH to "
                f"it (a script with an InMemoryImages dataset and a --data/--model/--steps/--batch-size command "
                f"line), or skip_speed=true time_to_accuracy=true to run the race alone."
            )
    at_budgets = bool(cfg.time_to_accuracy) and cfg.get("budgets") is not None
    photos_alone = at_budgets and seed_loop is None and bool(cfg.clothing_root)
    if not cfg.data_root and not photos_alone:
        raise ConfigError(
            "data_root= is not set: pass data_root=DIR, the CIFAR-10 image folders (DIR/train/<class>/*). Only the "
            "race at budgets runs without them (skip_speed=true time_to_accuracy=true budgets=[...] with "
            "clothing_root=DIR races the photos alone)."
        )
    if at_budgets:
        parse_budgets(cfg.budgets)
        parse_seeds(cfg.get("seeds"))
    data = ensure_data(Path(str(cfg.data_root)).expanduser(), _path(cfg.archive)) if cfg.data_root else None
    clothing = None
    if cfg.time_to_accuracy and cfg.clothing_root:
        clothing = ensure_data(
            Path(str(cfg.clothing_root)).expanduser(), _path(cfg.clothing_archive), "clothing_root", "clothing_archive"
        )
    return data, seed_loop, clothing


def _race(cfg: DictConfig, data: Path | None, clothing: Path | None) -> dict[str, Any] | None:
    """The race ``time_to_accuracy=true`` asks for: by epochs, or at ``budgets`` (minutes) when they are set."""
    if not cfg.time_to_accuracy:
        return None
    if cfg.get("budgets") is None:
        assert data is not None  # inputs() refuses data_root=null outside the race at budgets
        return {"title": "Time-to-accuracy race (python -m transfer.benchmarks.race)", **race(data, clothing)}
    result = budget_race(data, clothing, parse_budgets(cfg.budgets), seeds=parse_seeds(cfg.get("seeds")))
    return {"title": "Race at budgets (transfer.run budget=B against the budget-aware plain loop)", **result}


@checked_command_line("transfer.benchmarks", CONF_PATH, "tools/benchmarks")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/benchmarks")
@report_errors
def main(cfg: DictConfig) -> None:
    """Command-line entry: measure, print the table, write ``outputs/benchmarks/<time>.{md,json}``."""
    data, seed_loop, clothing = inputs(cfg)
    if seed_loop is None or data is None:  # the race alone
        results: dict[str, list[dict[str, Any]]] = {}
        text = f"Machine: {machine()}; data {data or clothing}."
        print(text, flush=True)
    else:
        header = f"Machine: {machine()}. Medians of {cfg.repeats} interleaved repeats; data {data}."
        print(header, flush=True)
        results = collect(data, seed_loop, int(cfg.repeats))
        text = markdown(table(results), header)
        print("\n" + text)
    race_result = _race(cfg, data, clothing)
    if race_result:
        text += f"\n\n{race_result['title']}:\n\n" + race_result["table"]
    out = Path.cwd() / "outputs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    (out / f"{stamp}.md").write_text(text + "\n")
    (out / f"{stamp}.json").write_text(
        json.dumps({"machine": machine(), "results": results, "race": race_result and race_result["results"]}, indent=1)
    )
    print(f"\nwritten to {out / stamp}.md and .json")


if __name__ == "__main__":
    main()
