"""Hyperparameter search with Optuna: ``python -m transfer.run -m hparams_search=cifar10`` (or ``imagefolder``).

``conf/hparams_search/*.yaml`` switch Hydra's sweeper to hydra-optuna-sweeper (TPE) with a search space over
the learning rate, the backbone's lr ratio, the unfreeze epoch, label smoothing and weight decay; every trial
is one ``transfer.run`` whose return value, the best validation accuracy, is maximised. The study is stored in
SQLite inside the sweep directory (``optuna.db``), so running the same command again with
``hydra.sweep.dir=<that directory>`` continues it: :class:`StudyReport` counts the trials already finished,
marks the ones an interruption left running as failed, and lets the sweeper run only the remaining trials.

When the search ends, the sweep report (``report.md``, see :mod:`transfer.experiments.report`) gains a section on the
study: the best trial and its parameters, every trial's value and parameters (``study.csv``) and the trial
history figure ``trial_history.png`` (each trial's value and the best so far). Rebuild it any time with
``python -m transfer.hparams_search sweep=<sweep dir>`` (settings: ``conf/tools/hparams_search.yaml``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from transfer.core.errors import ConfigError
from transfer.core.escape import csv_record, markdown, markdown_code
from transfer.experiments.report import SweepReport, write_report


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as err:
        raise ConfigError('Hyperparameter search needs Optuna: pip install -e ".[hparams]".') from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def study_settings(config: DictConfig | ListConfig, resolve: bool = True) -> tuple[str, str, int] | None:
    """``(storage URL, study name, n_trials)`` of an Optuna sweep with storage, else ``None``.

    Args:
        config: the multirun's config (Hydra's, or a saved ``multirun.yaml`` with ``resolve=False``).
        resolve: resolve interpolations (a saved config's ``${now:...}`` cannot be).
    """
    node = OmegaConf.select(config, "hydra.sweeper", default=None)
    sweeper = OmegaConf.to_container(node, resolve=resolve) if node is not None else {}
    if not isinstance(sweeper, dict):
        return None
    if "optuna" not in str(sweeper.get("_target_", "")) or not sweeper.get("storage"):
        return None
    return str(sweeper["storage"]), str(sweeper["study_name"]), int(sweeper["n_trials"])


def load_study(storage: str, name: str) -> Any | None:
    """The stored study, or ``None`` when the storage holds none of that name yet."""
    optuna = _optuna()
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # optuna 2.x: no study of that name
        return None


def resume(storage: str, name: str, n_trials: int) -> tuple[int, int]:
    """Prepare a study to continue: stale RUNNING trials become FAIL.

    Returns:
        How many trials remain to run, and how many the study already holds (any state).
    """
    optuna = _optuna()
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    study = load_study(storage, name)
    if study is None:
        return n_trials, 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL)  # interrupted: never told
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    print(f"continuing study {name!r}: {done} of {n_trials} trials already complete", flush=True)
    return max(0, n_trials - done), len(study.trials)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, its value (``best_val_acc``, a fraction), duration in seconds and
    parameters: ``study.csv``'s columns."""
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"trial": t.number, "state": t.state.name, "best_val_acc": t.value, "seconds": seconds, **t.params})
    return rows


def history_figure(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Each complete trial's best validation accuracy and the best so far, by trial number."""
    from matplotlib.ticker import MaxNLocator

    from transfer.core.plots import _save, plt

    done = [r for r in rows if r["state"] == "COMPLETE" and r["best_val_acc"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if done:
        xs, ys = [r["trial"] for r in done], [r["best_val_acc"] for r in done]
        best = [max(ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, s=18, label="trial")
        ax.step(xs, best, where="post", color="C1", label="best so far")
    failed = [r["trial"] for r in rows if r["state"] != "COMPLETE"]
    if failed:
        ax.scatter(
            failed,
            [min([r["best_val_acc"] for r in done] or [0])] * len(failed),
            marker="x",
            color="C3",
            label="failed / interrupted",
        )
    ax.set(xlabel="trial", ylabel="best val accuracy", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    _save(fig, path)


def _fmt(value: Any, column: str = "") -> str:
    """A Markdown cell's text: the accuracy in %, seconds to a tenth, parameters to 4 significant digits."""
    if value is None:
        return ""
    if column == "best_val_acc" and isinstance(value, float):
        return f"{100 * value:.2f}%"
    if column == "seconds" and isinstance(value, float):
        return f"{value:.1f} s"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_markdown(study: Any, rows: list[dict[str, Any]]) -> str:
    """The report section: best trial, then every trial."""
    params = sorted({k for r in rows for k in r} - {"trial", "state", "best_val_acc", "seconds"})
    lines = [
        "",
        f"## Hyperparameter search: study {markdown_code(study.study_name)} ({len(rows)} trials, maximise best "
        "val acc)",
    ]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        best = study.best_trial
        lines += [
            "",
            f"**Best trial {best.number}: best val accuracy {100 * best.value:.2f}%** with "
            + ", ".join(markdown_code(f"{k}={_fmt(v)}") for k, v in best.params.items()),
        ]
    cols = ["trial", "state", "best_val_acc", "seconds", *params]
    lines += ["", "| " + " | ".join(markdown(c) for c in cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(markdown(_fmt(r.get(c), c)) for c in cols) + " |" for r in rows]
    return "\n".join([*lines, "", "![trial history](trial_history.png)", ""])


def write_study_report(sweep: Path, storage: str, name: str) -> Path | None:
    """``study.csv``, ``trial_history.png`` and a study section appended to ``report.md`` in ``sweep``."""
    study = load_study(storage, name)
    if study is None or not study.trials:
        return None
    rows = trial_rows(study)
    with open(sweep / "study.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows([csv_record(r) for r in rows])
    history_figure(rows, sweep / "trial_history.png", f"study {name}: best val accuracy per trial")
    report = sweep / "report.md"
    head = report.read_text() if report.exists() else f"# Sweep report: {markdown(sweep)}\n"
    report.write_text(head.split("\n## Hyperparameter search")[0].rstrip("\n") + "\n" + study_markdown(study, rows))
    return report


class StudyReport(SweepReport):
    """Hydra callback for Optuna sweeps: resumes a stored study, and adds the study to the sweep report."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = study_settings(config)
        if settings is None:
            return
        remaining, existing = resume(*settings)
        with read_write(config), open_dict(config):
            config.hydra.sweeper.n_trials = remaining  # the sweeper is built from this config next
            seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed", default=None)
            if existing and seed is not None:  # a restarted seeded sampler would propose the first trials again
                config.hydra.sweeper.sampler.seed = int(seed) + existing

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            super().on_multirun_end(config, **kwargs)  # exits non-zero when a job failed, after its report
        finally:
            settings = study_settings(config)
            if settings is not None:
                report = write_study_report(Path(config.hydra.sweep.dir), settings[0], settings[1])
                if report:
                    print(f"study report: {report}")


USAGE = (
    "python -m transfer.hparams_search sweep=<sweep directory of a hparams_search run, the one holding "
    "multirun.yaml and optuna.db>"
)


def rebuild(sweep: Path) -> Path:
    """Rebuild the sweep report and the study section of a (possibly interrupted) search; returns ``report.md``.

    Args:
        sweep: the search's sweep directory (``multirun.yaml`` and ``optuna.db`` in it).

    Raises:
        ConfigError: not such a directory, or a study without trials.
    """
    if not (sweep / "multirun.yaml").is_file():
        raise ConfigError(f"{sweep} holds no multirun.yaml. Usage: {USAGE}.")
    settings = study_settings(OmegaConf.load(sweep / "multirun.yaml"), resolve=False)
    if settings is None:
        raise ConfigError(f"{sweep / 'multirun.yaml'} is not an Optuna sweep with a storage (hparams_search=...).")
    if any(sweep.rglob("summary.json")):
        write_report(sweep)
    # multirun.yaml keeps the storage URL unresolved (${now:...} would re-resolve), so name the file directly.
    report = write_study_report(sweep, f"sqlite:///{sweep / 'optuna.db'}", settings[1])
    if report is None:
        raise ConfigError(f"The study {settings[1]!r} in {settings[0]} has no trials yet.")
    return report
