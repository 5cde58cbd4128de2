"""What every ``ketch`` command shares: exit codes, errors as messages, tables."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

import click

from ketch import errors

EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 3


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable) -> Callable:
    """Turn Ketch errors into a message and an exit code instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except errors.Unavailable as exc:
            text = str(exc)
            if "ketch broker start" not in text:
                text += "\n  is the broker running? start one with: ketch broker start"
            _fail(text, EXIT_UNAVAILABLE)
        except errors.Timeout as exc:
            _fail(str(exc), EXIT_UNAVAILABLE)
        except errors.RequestError as exc:
            _fail(f"{exc.code_name}: {exc.message}", EXIT_REFUSED)
        except (ValueError, TypeError) as exc:
            raise click.UsageError(str(exc)) from None

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
