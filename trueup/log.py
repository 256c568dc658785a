"""Structured logs: one event name and key=value fields per line.

On a terminal lines read as ``12:00:01 info  diff.segment reconciliation=orders run_id=7``;
elsewhere (or with ``TRUEUP_LOG_FORMAT=json``) each line is a JSON object, ready for a log
pipeline. Level from ``TRUEUP_LOG_LEVEL`` (default ``info``). Logs go to stderr so that
``--json`` output on stdout stays clean. Fields bound with :func:`bound` (where a worker's
message is: topic, partition and offset, or queue and delivery tag) go on every line logged
within the block, in that thread and in what it runs in a copy of its context.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

_CONFIGURED = False
#: Fields every line logged in this context carries (see :func:`bound`).
_BOUND: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "trueup_log_fields", default=MappingProxyType({}))


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        # a record another library made may name its event apart from its text
        event = getattr(record, "event", None) or record.getMessage()
        at = dt.datetime.fromtimestamp(record.created, dt.UTC)
        if self.as_json:
            line = {"at": at.isoformat(timespec="milliseconds"), "level": record.levelname.lower(),
                    "event": event, "logger": record.name, **fields}
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
            return json.dumps(line, default=str)
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{at:%H:%M:%S} {record.levelname.lower():5} {event} {pairs}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text.rstrip()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now, not the one seen when logging was set up
    (a test's captured stream, or a redirected one, may be closed by the time we log)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class StructuredLogger:
    """A thin wrapper: ``log.info("event.name", key=value, ...)``."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            exc_info = fields.pop("exc_info", None)
            for key, value in _BOUND.get().items():  # the line's own fields come first
                fields.setdefault(key, value)
            if "trace_id" not in fields and (trace_id := _trace_id()) is not None:
                fields["trace_id"] = trace_id
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged within the block (by this thread, or by code it
    runs in a copy of its context: ``contextvars.copy_context().run``), e.g. where the message
    a worker handles is, for the lines of the handler's failure, retry or dead-lettering."""
    token = _BOUND.set({**_BOUND.get(), **fields})
    try:
        yield
    finally:
        _BOUND.reset(token)


def _trace_id() -> str | None:
    """The active OpenTelemetry trace's id, so a log line can be found from its trace."""
    trace = sys.modules.get("opentelemetry.trace")  # not imported: no span can be active
    if trace is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def configure(level: str | None = None, as_json: bool | None = None) -> None:
    """Install the handler on the ``trueup`` logger (idempotent)."""
    global _CONFIGURED
    logger = logging.getLogger("trueup")
    level_name = (level or os.environ.get("TRUEUP_LOG_LEVEL", "info")).upper()
    logger.setLevel(getattr(logging, level_name, logging.INFO))
    if as_json is None:
        wanted = os.environ.get("TRUEUP_LOG_FORMAT")
        as_json = wanted == "json" if wanted else not sys.stderr.isatty()
    if _CONFIGURED:
        for handler in logger.handlers:
            handler.setFormatter(_Formatter(as_json))
        return
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(as_json))
    logger.addHandler(handler)
    logger.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(logging.getLogger(name if name.startswith("trueup") else
                                              f"trueup.{name}"))
