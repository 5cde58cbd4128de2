"""structlog set-up shared by the broker, the runtime and the CLI.

Logs go to stderr: JSON lines when stderr is not a terminal, coloured console lines
when it is. ``KETCH_LOG_LEVEL`` (debug, info, warning, error) sets the level.
``stdlib_config`` gives the same look to libraries that log through the standard
``logging`` module (uvicorn), through structlog's ``ProcessorFormatter``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def _renderer(json: bool | None) -> Any:
    as_json = (not sys.stderr.isatty()) if json is None else json
    return structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    level_name = (level or os.environ.get("KETCH_LOG_LEVEL") or "info").upper()
    numeric = getattr(logging, level_name, logging.INFO)
    renderer = _renderer(json)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def stdlib_formatter(json: bool | None = None) -> logging.Formatter:
    """A ``logging`` formatter that renders a record as Ketch's own lines are rendered (JSON
    when stderr is not a terminal): ``event``, ``level``, ``logger``, ``timestamp``."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _renderer(json),
        ],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
    )


def stdlib_config(loggers: list[str], json: bool | None = None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document sending ``loggers`` to stderr through
    ``stdlib_formatter`` (uvicorn applies it in its supervisor and in every worker)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ketch": {"()": stdlib_formatter, "json": json}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "ketch", "stream": "ext://sys.stderr"}
        },
        "loggers": {name: {"handlers": ["stderr"], "propagate": False} for name in loggers},
    }


def quiet_gc() -> None:
    """For a server process once it has started: what start-up made (modules, state, a
    model) moves out of the collector's sight, and the youngest generation is collected
    less often. A full collection over a busy server's heap is a pause that every request
    in flight waits for."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
