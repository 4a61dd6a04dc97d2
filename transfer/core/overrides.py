"""Path settings on the command line, as a shell user types them.

Hydra's override grammar reads ``[`` as the start of a list and ``,`` as a sweep, so a glob such as
``images=photos/000[0-3].jpg`` or two files ``images=a.jpg,b.jpg`` fail to parse (or become a sweep) before
the tool sees them. :func:`quote_path_overrides` rewrites such values into Hydra's quoted string form before
Hydra parses the command line; a value Hydra reads as a plain string or a list (``images=[a.jpg,b.jpg]``) is
left alone. The tool then splits a quoted ``a.jpg,b.jpg`` itself (:func:`path_specs`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


def _hydra_quote(value: str) -> str:
    # In Hydra's quoted strings a backslash escapes only a quote (or the backslashes before one, or the end).
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    trailing = len(escaped) - len(escaped.rstrip("\\"))
    return "'" + escaped + "\\" * trailing + "'"


def _needs_quotes(arg: str, parser: OverridesParser) -> bool:
    try:
        override = parser.parse_override(arg)
    except HydraException:
        return True  # a glob character class, unbalanced brackets, ...
    return override.is_sweep_override()  # a comma: several paths, not a sweep


def quote_path_overrides(argv: Sequence[str], keys: Iterable[str]) -> list[str]:
    """``argv`` with each ``key=value`` for a path ``key`` quoted for Hydra where its grammar would misread it.

    Args:
        argv: the command line after the program name (``sys.argv[1:]``).
        keys: the settings that hold paths or patterns (``images``, ``parity.images``).

    Returns:
        The arguments, those that needed it rewritten as ``key='value'``.
    """
    keys, parser, out = set(keys), OverridesParser.create(), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and value and _needs_quotes(arg, parser):
            arg = f"{key}={_hydra_quote(value)}"
        out.append(arg)
    return out


def path_specs(value: str | Sequence[str]) -> list[str]:
    """The paths or patterns a setting names: a list as given, a string split at commas.

    Args:
        value: ``images=`` after Hydra: one string (``photos/``, ``a.jpg,b.jpg``) or a list of them.

    Returns:
        The non-empty specs, in order.
    """
    items = [value] if isinstance(value, str) else [str(v) for v in value]
    # a path that exists with a comma in its name stays whole
    return [
        part.strip() for item in items for part in ([item] if Path(item).exists() else item.split(",")) if part.strip()
    ]
