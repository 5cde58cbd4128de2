"""structlog set-up shared by the broker, the runtime and the CLI.

Logs go to stderr: JSON lines when stderr is not a terminal, coloured console lines
when it is. ``KETCH_LOG_LEVEL`` (debug, info, warning, error) sets the level.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import structlog

_configured = False


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    level_name = (level or os.environ.get("KETCH_LOG_LEVEL") or "info").upper()
    numeric = getattr(logging, level_name, logging.INFO)
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
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


def quiet_gc() -> None:
    """For a server process once it has started: what start-up made (modules, state, a
    model) moves out of the collector's sight, and the youngest generation is collected
    less often. A full collection over a busy server's heap is a pause that every request
    in flight waits for."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
