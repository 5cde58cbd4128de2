"""What every ``ketch`` command shares: exit codes, errors as messages, tables.

Light to import (click and the standard library only): ``ketch.errors`` comes with the
client and the admin API, which the commands import when they run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, NoReturn

import click

EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_TARGET = 1, 3, 4


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable) -> Callable:
    """Turn Ketch errors into a message and an exit code instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (ValueError, TypeError) as exc:
            raise click.UsageError(str(exc)) from None
        except Exception as exc:
            errors = sys.modules.get("ketch.errors")  # a Ketch error means it was imported
            if errors is None or not isinstance(exc, errors.KetchError):
                raise
            if isinstance(exc, errors.Unavailable):
                text = str(exc)
                if "ketch broker start" not in text:
                    text += "\n  is the broker running? start one with: ketch broker start"
                _fail(text, EXIT_UNAVAILABLE)
            if isinstance(exc, errors.RequestError):
                _fail(f"{exc.code_name}: {exc.message}", EXIT_REFUSED)
            _fail(str(exc), EXIT_UNAVAILABLE)  # errors.Timeout

    return wrapper


def table_lines(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    """Rows under a header, in aligned columns."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
