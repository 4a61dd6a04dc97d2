"""Training: the LightningModule, fine-tuning plan and param groups, schedules, callbacks, checkpoints and resume.

:func:`transfer.training.train.train` is one run from a composed config (instantiate, fit, test, write outputs).
It builds on :mod:`transfer.models` and :mod:`transfer.data` and never on the layers above it.
"""
