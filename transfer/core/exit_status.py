"""Exit statuses of a stopped run, without importing Lightning.

:func:`graceful_exit` wraps ``python -m transfer.run``'s main: a run stopped by SIGINT/SIGTERM (recorded in
:data:`STOPPED_BY` by :class:`transfer.training.stops.GracefulStop`) exits with 128 + the signal number. It lives apart
from the callback so that the command line can decorate its main, and answer ``--help`` or a bad setting,
before Lightning's ~10 s of imports.
"""

from __future__ import annotations

import shlex
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
# The signal that stopped the last run in this process (set by GracefulStop, read by graceful_exit).
STOPPED_BY: dict[str, int] = {}


def resume_command(checkpoint: Path) -> str:
    """The command line that continues from ``checkpoint``: this run's overrides plus ``resume=...``."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    except ValueError:  # not started by Hydra (library use)
        pass
    return " ".join(["python -m transfer.run", *map(shlex.quote, overrides), shlex.quote(f"resume={checkpoint}")])


def graceful_exit(fn: F) -> F:
    """Exit with 128 + signal number after a run stopped by SIGINT/SIGTERM (see the module docstring)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        STOPPED_BY.clear()
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit) as err:
            if isinstance(err, KeyboardInterrupt):
                STOPPED_BY.setdefault("signal", int(signal.SIGINT))
            if "signal" in STOPPED_BY:
                sys.exit(128 + STOPPED_BY["signal"])
            raise

    return wrapper  # type: ignore[return-value]
