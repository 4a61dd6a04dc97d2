"""transfer: fine-tune pretrained image classifiers with PyTorch Lightning and Hydra."""

from transfer.core.quiet import (
    quiet as _quiet,  # not bound as `quiet`: that name stays the submodule
)

__version__ = "0.1.0"

_quiet()  # before any entry point or library call builds a Trainer: no advertising tips or library-internal noise
