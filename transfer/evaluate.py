"""``python -m transfer.evaluate ckpt=<checkpoint or run dir> [data=...] [split=test]``: the evaluate-only path.

Score a checkpoint on a split: metrics.json, report.md, confusion matrix, top losses; ``limit=`` scores a seeded,
class-stratified subset. SIGINT/SIGTERM stop it with one line and exit status 130/143, leaving no report. The work
is done by :mod:`transfer.deploy.evaluate`; this module is the command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors
from transfer.core.exit_status import STOPPED_BY, announce_stop, graceful_exit, stop_signal
from transfer.deploy.evaluate import evaluate, report_markdown


@checked_command_line("transfer.evaluate", CONF_PATH, "tools/evaluate")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/evaluate")
@report_errors
@graceful_exit  # SIGINT/SIGTERM: one line, exit status 130/143, no report written
def main(cfg: DictConfig) -> float:
    """Command-line entry."""
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    try:
        metrics = evaluate(cfg, out, list(hydra_cfg.overrides.task))  # data.* of these go on top of the run's data
    except (KeyboardInterrupt, SystemExit) as err:
        signum = stop_signal(err)
        if signum is not None and STOPPED_BY.get("announced") != signum:
            announce_stop(signum, f"before every image was scored: no report was written (in {out})")
        raise
    print(report_markdown(metrics, "evaluation"))
    print(f"outputs in {out}")
    return metrics["accuracy"]


if __name__ == "__main__":
    main()
