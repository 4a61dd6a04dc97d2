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
from omegaconf import DictConfig, ListConfig, OmegaConf

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import ConfigError, report_errors
from transfer.core.exit_status import graceful_exit
from transfer.data.folders import collect_images
from transfer.deploy.load import load_classifier
from transfer.deploy.predict import (
    USAGE,
    Predictor,
    failed_images,
    predict,
    pretrained_imagenet,
    print_table,
    write_results,
)


@checked_command_line("transfer.predict", CONF_PATH, "tools/predict", ("images",))  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/predict")
@report_errors
@graceful_exit  # SIGINT/SIGTERM: one line, exit status 130/143
def main(cfg: DictConfig) -> list[dict[str, Any]]:
    """Command-line entry: predict, write the results, print a table.

    Every readable image is predicted and written; when some could not be read the command ends with one
    paragraph naming them and exit status 2, unless ``skip_corrupt=true``.
    """
    if not (cfg.ckpt or cfg.model) or OmegaConf.is_missing(cfg, "images") or not cfg.images:
        raise ConfigError(f"Pass ckpt= (or model=) and images=. Usage: {USAGE}.")
    module: Predictor
    if cfg.ckpt:
        module = load_classifier(cfg.ckpt)
    else:
        module = pretrained_imagenet(str(cfg.model.name), cfg.model.get("weights"))
    # a list stays a list (images=[a.jpg,b.jpg]); str() of a ListConfig would be one unmatched "['a.jpg', ...]"
    images = OmegaConf.to_container(cfg.images) if isinstance(cfg.images, ListConfig) else None
    files = collect_images([str(i) for i in images] if isinstance(images, list) else str(cfg.images))
    max_mp = cfg.get("max_megapixels")
    max_pixels = None if max_mp is None else int(float(max_mp) * 1e6)
    results = predict(module, files, int(cfg.topk), int(cfg.batch_size), str(cfg.device), max_pixels)
    out = Path(cfg.out or f"outputs/predictions/{datetime.now():%Y-%m-%d_%H-%M-%S-%f}").expanduser()
    write_results(results, out)
    read = [r for r in results if not r["error"]]
    if cfg.grid and read:
        from transfer.core.plots import image_grid

        image_grid(
            [r["image"] for r in read],
            [f"{r['label']} {r['prob']:.2f}" for r in read],
            [r["true"] for r in read],
            out / "predictions.png",
        )
    print_table(results)
    print(f"\n{len(read)} of {len(results)} images predicted; results in {out}")
    failed = failed_images(results)
    if failed is not None and not cfg.get("skip_corrupt", False):
        raise failed
    return results


if __name__ == "__main__":
    main()
