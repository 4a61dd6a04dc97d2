"""``python -m transfer.evaluate ckpt=<checkpoint or run dir> [data=...] [split=test]``: the evaluate-only path.

Score a checkpoint on a split: metrics.json, report.md, confusion matrix, top losses. The work is done by
:mod:`transfer.deploy.evaluate`; this module is the command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.errors import report_errors
from transfer.deploy.evaluate import evaluate, report_markdown


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/evaluate")
@report_errors
def main(cfg: DictConfig) -> float:
    """Command-line entry."""
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    metrics = evaluate(cfg, out, list(hydra_cfg.overrides.task))  # data.* of these go on top of the run's data
    print(report_markdown(metrics, "evaluation"))
    print(f"outputs in {out}")
    return metrics["accuracy"]


if __name__ == "__main__":
    main()
