"""``python -m transfer.models``: the model zoo as a table (parameters counted without allocating weights).

A Hydra app like every ``python -m transfer.<tool>`` (``--help``; no settings, ``conf/tools/models.yaml``).
The adapt columns come from the functions a run calls (:func:`~transfer.models.resolve_adapt`,
:func:`~transfer.models.model_preprocess`), for 32 px inputs and for the run's CIFAR-10 config as composed.
"""

from __future__ import annotations

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import DictConfig

from transfer.conf import CONF_DIR, CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.models import REGISTRY, Architecture, model_preprocess, resolve_adapt

SMALL = 32  # CIFAR's own side: what auto does when the data is fed at it


def _params(arch: Architecture) -> int:
    with torch.device("meta"):  # shapes only: lists even the largest models in seconds and no memory
        return sum(p.numel() for p in arch.build().parameters())


def cifar10_input() -> tuple[int | None, int | None]:
    """``data.image_size`` and the data's own side of the run's CIFAR-10 config (``conf/data/cifar10.yaml``), as
    ``python -m transfer.run data=cifar10`` composes it."""
    overrides = ["data=cifar10"]
    if GlobalHydra.instance().is_initialized():  # inside this Hydra app: the same search path, conf/
        data = compose("config", overrides=overrides).data
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            data = compose("config", overrides=overrides).data
    # The data class is named by the config, so the listing reads its native size without importing the data layer.
    return data.get("image_size"), getattr(get_class(data._target_), "native_size", None)


def auto_columns(name: str, image_size: int | None, native_size: int | None) -> dict[str, str]:
    """What ``model.adapt=auto`` resolves to for ``name`` at 32 px and for the CIFAR-10 run (mode@size)."""
    at_run = resolve_adapt(name, "auto", image_size, native_size)
    size = model_preprocess(name, at_run, image_size, native_size).image_size
    return {"auto@32px": resolve_adapt(name, "auto", SMALL, native_size), "auto@cifar10": f"{at_run}@{size}px"}


def rows(cifar10: tuple[int | None, int | None] | None = None) -> list[dict[str, str]]:
    """One dict per registered model, as shown by the listing.

    Args:
        cifar10: ``(data.image_size, native size)`` of the CIFAR-10 run; ``None`` composes the run's config.
    """
    image_size, native_size = cifar10 or cifar10_input()
    out = []
    for name in sorted(REGISTRY, key=lambda n: (REGISTRY[n].family, n)):
        arch = REGISTRY[name]
        cfg = arch.pretrained_cfg
        source = cfg.source
        out.append(
            {
                "name": name,
                "family": arch.family,
                "params": f"{_params(arch) / 1e6:.1f}M",
                "input": str(cfg.input_size),
                "crop_pct": f"{model_preprocess(name, 'resize').crop_pct:.3f}",
                "mean/std": "/".join(f"{m:.3g}" for m in cfg.mean) + " " + "/".join(f"{s:.3g}" for s in cfg.std),
                "weights": source.describe() if source else "none (scratch)",
                "offline": ("yes" if source.available_offline() else "no") if source else "-",
                **auto_columns(name, image_size, native_size),
            }
        )
    return out


@checked_command_line("transfer.models", CONF_PATH, "tools/models")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/models")
def main(cfg: DictConfig) -> None:
    """Print the table (``cfg`` holds no settings; Hydra gives the tool the common ``--help``)."""
    table = rows(cifar10_input())
    cols = list(table[0])
    widths = {c: max(len(c), *(len(r[c]) if c != "weights" else min(len(r[c]), 60) for r in table)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in table:
        print(
            "  ".join(
                (r[c] if len(r[c]) <= widths[c] else r[c][: widths[c] - 3] + "...").ljust(widths[c]) for c in cols
            )
        )


if __name__ == "__main__":
    main()
