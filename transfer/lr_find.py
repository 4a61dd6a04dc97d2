"""``python -m transfer.lr_find [any transfer.run overrides]``: Lightning's learning-rate range test.

Lightning's learning-rate range test on exactly what transfer.run would train. The work is done by
:mod:`transfer.experiments.lr_find`; this module is the command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors
from transfer.experiments.lr_find import lr_range_test


@checked_command_line("transfer.lr_find", CONF_PATH, "tools/lr_find")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/lr_find")
@report_errors
def main(cfg: DictConfig) -> float | None:
    """Print the suggested learning rate and where the plot is."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    result = lr_range_test(cfg, out_dir)
    lr = result["suggested_lr"]
    shown = f"none ({result['no_suggestion']})" if lr is None else f"{lr:.3g}"
    print(
        f"\nsuggested optimizer.lr: {shown} (configured: {result['configured_lr']:.3g}); "
        f"plot: {out_dir / 'lr_find.png'}"
    )
    return lr


if __name__ == "__main__":
    main()
