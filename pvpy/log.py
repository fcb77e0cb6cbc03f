"""Logging: JSON lines on the device, readable lines on a terminal.

Two back ends with one interface (``log.info("event", key=value)``, ``bind``):

- ``configure(lean=False)`` — structlog, for the workstation CLI and the
  device's helper processes;
- ``configure(lean=True)`` — a few lines of our own that write the same JSON
  lines as structlog's JSONRenderer. PID 1 uses it: importing structlog costs
  about 10 MB of PSS (it pulls asyncio), more than the whole rest of PID 1
  (ARCHITECTURE.md, "Measured on this kind of machine").

Log state changes at info, argv and payloads at debug, keys never.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import IO, Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

_state: dict[str, Any] = {"lean": None, "level": 20, "json": True, "stream": None}


def configure(
    *,
    json: bool | None = None,
    level: str | None = None,
    lean: bool = False,
    stream: IO[str] | None = None,
) -> None:
    """Choose the back end. ``json`` defaults to "the stream is not a terminal"
    (or PVPY_LOG_JSON=1)."""
    level_name = (level or os.environ.get("PVPY_LOG_LEVEL") or "info").lower()
    numeric = LEVELS.get(level_name, 20)
    out = stream or sys.stderr
    if os.environ.get("PVPY_LOG_TEXT") == "1":
        # `pvpy device run` on a terminal: a person reads PID 1's and its helpers' lines
        # (a board's console stays JSON lines: tests and tools parse them)
        json = False
    elif json is None:  # PID 1 sets PVPY_LOG_JSON for its helpers: the console may be a tty
        json = os.environ.get("PVPY_LOG_JSON") == "1" or not out.isatty()
    _state.update(lean=lean, level=numeric, json=json, stream=out)
    if lean:
        return
    import structlog

    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = _readable  # the same lines PID 1 writes (structlog's own differ)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


class LeanLogger:
    """structlog-shaped logger that writes one JSON object per line."""

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context

    def bind(self, **kw: Any) -> LeanLogger:
        return LeanLogger({**self._context, **kw})

    def _log(self, level: str, event: str, kw: dict[str, Any]) -> None:
        if LEVELS[level] < _state["level"]:
            return
        stream = _state["stream"] or sys.stderr
        record = {**self._context, **kw, "event": event, "level": level}
        now = time.time()
        record["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + (
            f".{int(now % 1 * 1e6):06d}Z"
        )
        try:
            if _state["json"]:
                import json

                line = json.dumps(record, default=str)
            else:
                line = readable_line(record)
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed console must never take PID 1 down

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        import traceback

        kw["exception"] = traceback.format_exc()
        self._log("error", event, kw)


def readable_line(record: dict[str, Any]) -> str:
    """One log record for a person: ``11:29:47.123 info  init     booting revision  revision=1``."""
    skip = ("event", "level", "timestamp", "logger")
    rest = {k: v for k, v in record.items() if k not in skip and v is not None}
    extra = " ".join(f"{k}={v}" for k, v in rest.items())
    stamp = str(record.get("timestamp", ""))[11:23]
    return (f"{stamp} {record.get('level', ''):<7} {record.get('logger', '-'):<10} "
            f"{record.get('event', ''):<26} {extra}").rstrip()  # fmt: skip


def _readable(_logger: Any, _method: str, record: dict[str, Any]) -> str:
    """structlog's last processor on a terminal: the lean back end's readable lines."""
    return readable_line(record)


def get_logger(name: str) -> Any:
    """A logger bound to ``name``; configures the lean back end if nobody did."""
    if _state["lean"] is None:
        configure(lean=True)
    if _state["lean"]:
        return LeanLogger({"logger": name})
    import structlog

    return structlog.get_logger(name).bind(logger=name)
