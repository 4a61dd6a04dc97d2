"""``python -m transfer.lr_find [any transfer.run overrides]``: Lightning's learning-rate range test.

Runs ``Tuner.lr_find`` on exactly what ``transfer.run`` would train with the same overrides (model, data,
optimizer, staged fine-tuning), writes the loss-vs-lr plot and prints the suggested ``optimizer.lr``. The range
test covers the first phase of the run: the head alone when the backbone starts frozen, the whole network
(every layer-decay group scaled alike) with ``finetune.unfreeze_at_epoch=0``. The suggestion is the steepest
descent of the smoothed loss, as Lightning (and fastai's ``lr_find``) computes it: a starting point to try, not
the answer; one-cycle schedules usually take a peak 3-10x above it.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from transfer.core.errors import ConfigError
from transfer.training.train import build, build_trainer, finetune_callbacks


def lr_range_test(cfg: DictConfig, out_dir: Path) -> dict[str, float | None]:
    """Run the range test and write ``lr_find.png`` and ``lr_find.json`` into ``out_dir``.

    Args:
        cfg: the composed ``transfer.run`` config plus the ``lr_find`` group (min_lr, max_lr, num_training).
        out_dir: where the plot and the numbers go.

    Returns:
        ``{"suggested_lr": ..., "configured_lr": ...}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    # The range test replaces the run's scheduler with its own exponential one; a per-step schedule would fight it.
    merged = OmegaConf.merge(cfg, {"scheduler": None})
    assert isinstance(merged, DictConfig)  # a DictConfig merged with a mapping stays one
    cfg = merged
    datamodule, module = build(cfg, cache_features=False)
    trainer = build_trainer(cfg, out_dir, finetune_callbacks(cfg))
    args = cfg.lr_find
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        num_training=args.num_training,
        update_attr=False,
    )
    if finder is None:
        raise ConfigError("The lr range test did not run (Lightning returned no result); check trainer.fast_dev_run.")
    suggestion = finder.suggestion()
    figure = finder.plot(suggest=suggestion is not None)
    if isinstance(figure, Figure):  # finder.plot draws a new Figure when given no axes
        figure.savefig(out_dir / "lr_find.png", dpi=120)
    result = {"suggested_lr": suggestion, "configured_lr": float(cfg.optimizer.lr)}
    (out_dir / "lr_find.json").write_text(
        json.dumps({**result, "lr": finder.results["lr"], "loss": finder.results["loss"]}, indent=1)
    )
    return result
