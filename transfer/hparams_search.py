"""Hyperparameter search with Optuna: ``python -m transfer.run -m hparams_search=cifar10`` (or ``imagefolder``).

Rebuild the report of an Optuna search (the search itself is transfer.run -m hparams_search=...). The work is done by
:mod:`transfer.experiments.hparams_search`; this module is the command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors, require
from transfer.experiments.hparams_search import USAGE, rebuild


@checked_command_line("transfer.hparams_search", CONF_PATH, "tools/hparams_search")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/hparams_search")
@report_errors
def main(cfg: DictConfig) -> None:
    """``python -m transfer.hparams_search sweep=<sweep dir>``: rebuild the study report and print it."""
    print(rebuild(Path(str(require(cfg, "sweep", USAGE))).expanduser()).read_text())


if __name__ == "__main__":
    main()
