"""``python -m transfer.serve ckpt=<checkpoint, run dir or exported .onnx> [port=8000] [host=127.0.0.1]``

An HTTP prediction server (LitServe) for a checkpoint, run directory or exported .onnx. The work is done by
:mod:`transfer.deploy.serve`; this module is the command. SIGTERM (or Ctrl-C) stops the server and its workers.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from transfer.conf import CONF_PATH
from transfer.core.command_line import checked_command_line
from transfer.core.errors import report_errors
from transfer.deploy.serve import serve


@checked_command_line("transfer.serve", CONF_PATH, "tools/serve")  # composition errors: exit 2
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="tools/serve")
@report_errors
def main(cfg: DictConfig) -> None:
    """Command-line entry: serve until interrupted (SIGINT or SIGTERM)."""
    serve(cfg)


if __name__ == "__main__":
    main()
