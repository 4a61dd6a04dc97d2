"""One report for a sweep: ``python -m transfer.report sweep=<sweep dir>``, also written after every ``-m`` run.

One report for a sweep, from its jobs' summary.json and history.json. The work is done by
:mod:`transfer.experiments.report`; this module is the command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors, require
from transfer.experiments.report import write_report


@checked_command_line("transfer.report", CONF_PATH, "tools/report")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/report")
@report_errors
def main(cfg: DictConfig) -> None:
    """``python -m transfer.report sweep=<sweep dir>``: write the report and print it (``conf/tools/report.yaml``)."""
    sweep = require(cfg, "sweep", "python -m transfer.report sweep=<sweep directory: outputs/sweeps/<date>/<time>>")
    path = write_report(Path(str(sweep)).expanduser())
    print(path.read_text())


if __name__ == "__main__":
    main()
