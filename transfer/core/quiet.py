"""Quiet runs: silence the library messages a user of this product can do nothing about.

A run's output should hold what the user can act on. Lightning prints advertising tips for its cloud products on
every Trainer it builds, an INFO line for each ``limit_*_batches`` our config spells out at its default, and (with
recent torch, e.g. 2.14) a ``FutureWarning`` from its own use of a deprecated torch class on every fit and test;
it also advises more loader workers where :mod:`transfer.data` keeps decoded images in memory and uses none.
Those are dropped here, each by its exact message, so every other warning, in particular those about a user's own
settings (e.g. ``log_every_n_steps`` longer than an epoch, a checkpoint directory that is not empty), still shows.

Each Lightning INFO line is printed once. The ``lightning`` package puts its own console handler on its logger,
which every ``lightning.*`` record passes on its way to the root logger, where Hydra's job logging has a console
handler too (and the ``run.log`` file handler): every line showed twice. :func:`route_lightning_logs` makes
Lightning's handler print only where the root logger has no console of its own (a notebook, a plain script), and
sends the records of a Lightning imported before logging was configured (which then stops them at its own
handler) on to the root's handlers, so ``run.log`` has them all.

:func:`quiet` runs when ``transfer`` is imported (``transfer/__init__.py``), so every entry point and library use
(``python -m transfer.<tool>``, :func:`transfer.training.train.train`, notebooks) gets it before Lightning builds a
Trainer; :mod:`transfer.training.train` calls it again once Lightning is imported, for the console handlers.
"""

from __future__ import annotations

import logging
import sys
import warnings

# Lightning logs its INFO lines through the rank-zero logger of whichever of its packages emitted them.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

# The `lightning` package's logger (its console handler: "INFO: message") and the packages below it that, when
# imported before the root logger has handlers, get a bare console handler of their own and stop propagating.
LIGHTNING_LOGGER = "lightning"
LIGHTNING_PACKAGES = ("lightning.pytorch", "lightning.fabric")

# INFO lines that are advertising or restate a default; matched at the start of the message.
NOISE_LOG_PREFIXES = (
    "💡 Tip:",  # litlogger / litmodels advertising, printed for every Trainer
)
# INFO lines matched anywhere in the message.
NOISE_LOG_PARTS = (
    "was configured so 100% of the batches",  # limit_*_batches=1.0, the default, which conf/trainer spells out
)

# (message regex, category, module regex) as for :func:`warnings.filterwarnings`.
NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6's own use of torch's deprecated LeafSpec (seen with torch 2.14); nothing of ours causes it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # Lightning's worker heuristic does not know that in-memory datasets are loaded with num_workers=0 on purpose
    # (one indexing copy per batch; worker processes would only add IPC).
    (r"The '\w+' does not have many workers", UserWarning, r"lightning\."),
    # Raised on every bf16/16-mixed GPU run: only the summary's size estimate, not the training, is affected.
    (r"Precision \S+ is not supported by the model summary", UserWarning, r"lightning\."),
)


class _DropNoise(logging.Filter):
    """Drops the log records listed in :data:`NOISE_LOG_PREFIXES` and :data:`NOISE_LOG_PARTS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(NOISE_LOG_PREFIXES) or any(part in message for part in NOISE_LOG_PARTS))


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class _UnlessRootPrints(logging.Filter):
    """On Lightning's console handler: drop a record the root logger's console handler prints as well.

    Decided per record, so it holds however the root logger is configured later (Hydra sets it up after the
    imports of a command, a notebook never).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(_is_console(h) for h in logging.getLogger().handlers)


def route_lightning_logs() -> None:
    """One console line per Lightning log record, and every record on to the root logger's handlers.

    Does nothing before Lightning is imported; calling it again changes nothing.
    """
    if LIGHTNING_LOGGER not in sys.modules:
        return
    for name in LIGHTNING_PACKAGES:
        package = logging.getLogger(name)
        bare = [h for h in package.handlers if type(h) is logging.StreamHandler and h.formatter is None]
        if not package.propagate and bare and len(bare) == len(package.handlers):
            # Lightning's own fallback for an unconfigured root logger: the package logger's handler does the
            # printing instead, and the root's handlers (run.log) see the record.
            for own in bare:
                package.removeHandler(own)
            package.propagate = True
    for handler in logging.getLogger(LIGHTNING_LOGGER).handlers:
        if _is_console(handler) and not any(isinstance(f, _UnlessRootPrints) for f in handler.filters):
            handler.addFilter(_UnlessRootPrints())


def quiet() -> None:
    """Install the filters; calling it again changes nothing.

    Warning filters are process state that ``warnings.catch_warnings`` blocks save and restore (pytest wraps each
    test in one), so code that runs inside such a block and wants the filters calls this again there.
    """
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for message, category, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    route_lightning_logs()
