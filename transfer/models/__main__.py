"""``python -m transfer.models``: the model zoo as a table (parameters counted without allocating weights).

A Hydra app like every ``python -m transfer.<tool>`` (``--help``; no settings, ``conf/tools/models.yaml``).
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.models import REGISTRY, Architecture


def _params(arch: Architecture) -> int:
    with torch.device("meta"):  # shapes only: lists even the largest models in seconds and no memory
        return sum(p.numel() for p in arch.build().parameters())


def rows() -> list[dict[str, str]]:
    """One dict per registered model, as shown by the listing."""
    out = []
    for name in sorted(REGISTRY, key=lambda n: (REGISTRY[n].family, n)):
        arch = REGISTRY[name]
        source = arch.weights
        out.append(
            {
                "name": name,
                "family": arch.family,
                "params": f"{_params(arch) / 1e6:.1f}M",
                "input": str(arch.input_size),
                "mean/std": "/".join(f"{m:.3g}" for m in arch.mean) + " " + "/".join(f"{s:.3g}" for s in arch.std),
                "weights": source.describe() if source else "none (scratch)",
                "offline": ("yes" if source.available_offline() else "no") if source else "-",
                "adapt@32px": arch.default_adapt,
            }
        )
    return out


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/models")
def main(cfg: DictConfig) -> None:
    """Print the table (``cfg`` holds no settings; Hydra gives the tool the common ``--help``)."""
    table = rows()
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
