"""User-facing errors: one paragraph saying what went wrong, where, and how to fix it.

Entry points catch :class:`TransferError` and print only its message (exit code 2); set ``HYDRA_FULL_ERROR=1``
to get the traceback instead.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar


class TransferError(Exception):
    """Base class for errors caused by input or environment rather than by a bug."""


class DataNotFoundError(TransferError):
    """No usable copy of a dataset was found and none could be downloaded."""


class WeightsUnavailableError(TransferError):
    """Pretrained weights were requested but cannot be had (offline, missing file, unsafe file)."""


class ConfigError(TransferError):
    """A configuration value is invalid or a run would overwrite an earlier one."""


class CorruptImagesError(DataNotFoundError):
    """Image files that cannot be decoded (truncated, not an image, unsupported)."""


class DivergenceError(TransferError):
    """Training produced a non-finite (or exploding) loss and was stopped."""


F = TypeVar("F", bound=Callable[..., Any])


def full_errors_requested() -> bool:
    """True when the user asked for full tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def require(cfg: Any, key: str, usage: str) -> Any:
    """The value of a setting a command line must give (``???`` in its YAML), else a :class:`ConfigError`.

    Args:
        cfg: the tool's composed config.
        key: the mandatory key (dotted for nested ones).
        usage: the tool's usage line, shown when the key is missing.

    Returns:
        The value.
    """
    from omegaconf import OmegaConf  # kept local: this module is imported by everything, and is dependency-free

    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key}= is required. Usage: {usage}")
    return OmegaConf.select(cfg, key)


def print_error(err: BaseException) -> None:
    """Print ``err`` as the one-paragraph message every command ends with on a refused input."""
    text = textwrap.fill(str(err), width=110, break_long_words=False, break_on_hyphens=False)
    print(f"\nerror: {text}\n(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)


def report_errors(fn: F) -> F:
    """Turn :class:`TransferError` into a one-paragraph message on stderr and exit status 2.

    Args:
        fn: an entry-point function.

    Returns:
        The wrapped function; with ``HYDRA_FULL_ERROR=1`` errors propagate unchanged.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TransferError as err:
            if full_errors_requested():
                raise
            print_error(err)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
