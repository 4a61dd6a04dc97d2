"""transfer: fine-tune pretrained image classifiers with PyTorch Lightning and Hydra."""
from transfer.quiet import quiet

__version__ = "0.1.0"

quiet()  # before any entry point or library call builds a Trainer: no advertising tips or library-internal noise
