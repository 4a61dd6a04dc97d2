"""Inside residual blocks: how much each block changes its input, and how gradients flow through it.

Inside residual blocks: F(x) = H(x) - x measured per block, and plain vs residual training. The work is done by
:mod:`transfer.experiments.residuals`; this module is the command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors
from transfer.experiments.residuals import run


@checked_command_line("transfer.residuals", CONF_PATH, "tools/residuals")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/residuals")
@report_errors
def main(cfg: DictConfig) -> None:
    """``python -m transfer.residuals model=resnet18 [ckpt=...] [plain_vs_residual.steps=200]``."""
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
