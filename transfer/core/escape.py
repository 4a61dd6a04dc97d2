"""Text that came from files (class and folder names, overrides, error reasons) made inert where it is written.

A class name is whatever a folder or a checkpoint says it is. Written as it is into a CSV, ``=cmd|' /C calc'!A0``
is a formula a spreadsheet evaluates when the file is opened; written into a Markdown report, ``a|b`` splits a
table row and ``<img src=x onerror=...>`` is HTML a viewer renders. Every CSV and Markdown file the project writes
passes such text through this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# What makes a spreadsheet read a cell as a formula (OWASP's list: =, +, -, @, tab, carriage return).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_MARKDOWN_SPECIAL = re.compile(r"([\\`|])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def csv_cell(value: Any) -> Any:
    """One CSV cell: a string a spreadsheet would evaluate gets a leading ``'``; anything else is unchanged.

    Args:
        value: the cell's value (numbers and ``None`` pass through, so they stay numbers in the file).

    Returns:
        The value to hand to :mod:`csv`.
    """
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_row(values: Iterable[Any]) -> list[Any]:
    """:func:`csv_cell` applied to every cell of a ``csv.writer`` row."""
    return [csv_cell(v) for v in values]


def csv_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`csv_cell` applied to every value of a ``csv.DictWriter`` row (the keys are the file's own columns)."""
    return {k: csv_cell(v) for k, v in record.items()}


def markdown(text: Any) -> str:
    """Text as literal Markdown, safe inside a table cell: no markup, no HTML, no row break.

    Backslashes, backticks and pipes are backslash-escaped, ``&``/``<``/``>`` become entities (no HTML is
    rendered), line breaks become spaces and a leading ``#`` cannot start a heading. Emphasis characters are left
    as they are: at worst they change how a name looks, and escaping them would clutter every ``snake_case`` name.

    Args:
        text: anything; ``str()`` of it is escaped.

    Returns:
        The escaped text.
    """
    out = " ".join(str(text).splitlines())
    out = "".join(_HTML.get(ch, ch) for ch in out)
    out = _MARKDOWN_SPECIAL.sub(r"\\\1", out)
    return "\\" + out if out.lstrip().startswith("#") else out


def markdown_code(text: Any) -> str:
    """Text as one Markdown code span, shown verbatim whatever backticks or HTML it holds.

    A code span delimited by more backticks than the longest run inside cannot be closed early, and its content
    is never parsed as Markdown or HTML; line breaks become spaces, pipes are escaped (GitHub's tables split on
    them even inside code).

    Args:
        text: anything; ``str()`` of it is wrapped.

    Returns:
        The code span.
    """
    body = " ".join(str(text).splitlines()).replace("|", "\\|")
    runs = [len(r) for r in re.findall(r"`+", body)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") or not body.strip() else ""
    return f"{fence}{pad}{body}{pad}{fence}"
