"""``python -m transfer.export ckpt=<checkpoint or run dir> format=onnx|torchscript [out=DIR]``

A trained checkpoint as ONNX or TorchScript, checked for parity before it reports success. The work is done by
:mod:`transfer.deploy.export`; this module is the command.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors
from transfer.core.exit_status import graceful_exit
from transfer.deploy.export import export
from transfer.deploy.onnx_runtime import sidecar_path


@checked_command_line("transfer.export", CONF_PATH, "tools/export", ("parity.images",))  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/export")
@report_errors
@graceful_exit  # SIGINT/SIGTERM: one line, exit status 130/143
def main(cfg: DictConfig) -> dict[str, Any]:
    """Command-line entry; returns the sidecar's contents."""
    path, info = export(cfg)
    p = info["parity"]
    print(
        f"exported {path} ({info['format']}, {sidecar_path(path).name} beside it)\nparity on {p['source']}: "
        f"top-1 {p['top1_agree']}/{p['images']}, max |dprob| {p['max_abs_prob_diff']:.2e} (<= {p['atol']:.0e}), "
        f"max |dlogit| {p['max_abs_logit_diff']:.2e}"
    )
    return info


if __name__ == "__main__":
    main()
