"""Logging: structlog, JSON lines on the device, readable lines on a terminal.

``configure()`` is called once by each entry point; ``get_logger()`` works
before that too (structlog's defaults). Log state changes at info, argv and
payloads at debug, keys never.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_configured = False


def configure(*, json: bool | None = None, level: str | None = None) -> None:
    """Set up structlog. ``json`` defaults to "stderr is not a terminal"."""
    global _configured
    import structlog

    level_name = (level or os.environ.get("PVPY_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    import structlog

    if not _configured:
        configure()
    return structlog.get_logger(name).bind(logger=name)
