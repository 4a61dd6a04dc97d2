"""``python -m transfer.predict ckpt=<checkpoint or run dir> images=<file, folder or glob> [topk=5] [grid=true]``

Top-k class names and probabilities for new images, from a checkpoint alone, or with ``model=<name>`` from that
model's pretrained ImageNet classifier. The work is done by :mod:`transfer.deploy.predict`; this module is the
command.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from transfer.conf import CONF_PATH
from transfer.core.errors import ConfigError, report_errors
from transfer.data.folders import collect_images
from transfer.deploy.load import load_classifier
from transfer.deploy.predict import (
    USAGE,
    Predictor,
    predict,
    pretrained_imagenet,
    print_table,
    write_results,
)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/predict")
@report_errors
def main(cfg: DictConfig) -> list[dict[str, Any]]:
    """Command-line entry: predict, write the results, print a table."""
    if not (cfg.ckpt or cfg.model) or OmegaConf.is_missing(cfg, "images") or not cfg.images:
        raise ConfigError(f"Pass ckpt= (or model=) and images=. Usage: {USAGE}.")
    module: Predictor
    if cfg.ckpt:
        module = load_classifier(cfg.ckpt)
    else:
        module = pretrained_imagenet(str(cfg.model.name), cfg.model.get("weights"))
    results = predict(module, collect_images(str(cfg.images)), int(cfg.topk), int(cfg.batch_size), str(cfg.device))
    out = Path(cfg.out or f"outputs/predictions/{datetime.now():%Y-%m-%d_%H-%M-%S-%f}").expanduser()
    write_results(results, out)
    if cfg.grid:
        from transfer.core.plots import image_grid

        image_grid(
            [r["image"] for r in results],
            [f"{r['label']} {r['prob']:.2f}" for r in results],
            [r["true"] for r in results],
            out / "predictions.png",
        )
    print_table(results)
    print(f"\n{len(results)} images; results in {out}")
    return results


if __name__ == "__main__":
    main()
