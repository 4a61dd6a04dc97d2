"""Exit statuses of a stopped run, without importing Lightning.

:func:`graceful_exit` wraps ``python -m transfer.run``'s main: a run stopped by SIGINT/SIGTERM (recorded in
:data:`STOPPED_BY` by :class:`transfer.training.stops.GracefulStop`) exits with 128 + the signal number. It lives apart
from the callback so that the command line can decorate its main, and answer ``--help`` or a bad setting,
before Lightning's ~10 s of imports.

:func:`stop_on_signals` is how every phase stops: while it is active, the first SIGINT/SIGTERM raises
:class:`Stopped` where the main thread is (decoding, feature caching, validation, test, writing outputs, a
prediction or an export), except inside training steps, where :func:`defer_stops` holds it until the next batch
boundary (a step is never cut in half; :class:`transfer.training.stops.GracefulStop` then saves the checkpoint).
A second signal always raises at once, and a third gets the signal's default action (the process ends).
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
# The signal that stopped the last run in this process (set by GracefulStop, read by graceful_exit).
STOPPED_BY: dict[str, int] = {}
# While training steps run, a first signal is only recorded ("pending"); see defer_stops.
_DEFER: dict[str, int | bool] = {"on": False, "count": 0}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A run or tool stopped by a signal: raised by the handlers of :func:`stop_on_signals`.

    A ``KeyboardInterrupt``, so that Lightning treats it as Ctrl-C (calls ``on_exception``, tears down) and code
    that catches ``Exception`` does not swallow it.

    Args:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def status(self) -> int:
        """The conventional exit status, 128 + the signal number (130, 143)."""
        return 128 + self.signum


def stop_signal(err: BaseException) -> int | None:
    """The signal that stopped the process if ``err`` is how a stop surfaced (``Stopped``, ``KeyboardInterrupt``,
    Lightning's ``SIGTERMException`` or the ``SystemExit`` Lightning turns an interrupt into), else ``None``."""
    if isinstance(err, Stopped):
        return err.signum
    if isinstance(err, KeyboardInterrupt):
        return STOPPED_BY.get("signal", int(signal.SIGINT))
    if type(err).__name__ == "SIGTERMException":
        return STOPPED_BY.get("signal", int(signal.SIGTERM))
    if isinstance(err, SystemExit):
        return STOPPED_BY.get("signal")
    return None


def pending_stop() -> int | None:
    """The signal received while stops were deferred and not yet acted on, or ``None``."""
    return STOPPED_BY.get("signal") if STOPPED_BY.get("pending") else None


def defer_stops(on: bool) -> None:
    """Hold (``True``) or stop holding a first signal until :func:`pending_stop` is acted on (training steps)."""
    _DEFER["on"] = on


def _handler(signum: int, frame: FrameType | None) -> None:
    _DEFER["count"] = int(_DEFER["count"]) + 1
    STOPPED_BY.setdefault("signal", int(signum))
    if _DEFER["count"] == 1 and _DEFER["on"]:
        STOPPED_BY["pending"] = 1
        return
    STOPPED_BY.pop("pending", None)
    if int(_DEFER["count"]) >= 2:
        for sig in _SIGNALS:  # the third signal ends the process whatever it is doing
            signal.signal(sig, signal.SIG_DFL)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`Stopped` while the block runs (see the module docstring).

    Outside the main thread (a server's worker) it does nothing: signals are delivered to the main thread.
    """
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _handler:
        yield  # not the main thread, or already inside stop_on_signals
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    STOPPED_BY.clear()
    _DEFER.update(on=False, count=0)
    for sig in _SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        _DEFER.update(on=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def announce_stop(signum: int, what: str) -> None:
    """Print the one line a stop ends with: ``stopped by SIGTERM <what>``."""
    print(f"\nstopped by {signal.Signals(signum).name} {what}", file=sys.stderr, flush=True)


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
    """Run ``fn`` under :func:`stop_on_signals`; exit with 128 + signal number after a run stopped by SIGINT/SIGTERM."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        STOPPED_BY.clear()
        try:
            with stop_on_signals():
                return fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit) as err:
            signum = stop_signal(err)
            if signum is not None:
                sys.exit(128 + signum)
            raise

    return wrapper  # type: ignore[return-value]
