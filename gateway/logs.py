"""Logging set-up: text for people, one JSON object per line for log pipelines.

Both formats carry every field passed with ``extra=`` (the access log's ``request_id``,
``status``, ``cache``, ...). A line logged while a request is handled carries that
request's id even without ``extra``: the front door starts the request's ``RequestTrace``
(a context variable, so it follows the request into the tasks it starts, and ends with the
request's own task) and the handler's ``RequestIdFilter`` copies its id onto each record.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from gateway.access_log import AccessLog, escape_text, logfmt
from gateway.request_trace import current as current_trace

FORMATS: Final = ("text", "json")
# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}
# The process's access log once ``setup_logging`` ran; before that (tests that build an app
# without it) access lines go through the ``gateway.access`` logger.
_access: AccessLog | None = None


class RequestIdFilter(logging.Filter):
    """Adds the id of the request being handled to records that do not carry one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = current_trace.get()
        if trace is not None and trace.request_id and not hasattr(record, "request_id"):
            record.request_id = trace.request_id
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as strings: JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the extras.

    An extra field never replaces one of the four; a traceback goes in ``exc`` (its line
    breaks escaped, so the record stays one line).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry.setdefault("exc", self.formatException(record.exc_info))
        if record.stack_info:
            entry.setdefault("stack", self.formatStack(record.stack_info))
        entry = _jsonable(entry)
        line = json.dumps(entry, default=str, ensure_ascii=False, allow_nan=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a crafted path: escape all
            line = json.dumps(entry, default=str, ensure_ascii=True, allow_nan=False)
        return line


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <message> key=value ...``: the extras in logfmt, for people.

    Control characters in the message and the values are escaped; only a traceback, which
    follows, spans lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = escape_text(record.getMessage())  # a value cannot start a forged line
        head = f"{_timestamp(record)} {record.levelname:<7} {record.name} {message}"
        fields = " ".join(f"{k}={logfmt(v)}" for k, v in _extras(record).items())
        line = f"{head} {fields}" if fields else head
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def setup_logging(
    level: str = "INFO", fmt: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Send every logger's lines to ``stream`` (stderr) in ``fmt``, from ``level`` up.

    Replaces the root logger's handlers and returns the one installed; access lines go to the
    same stream through an ``AccessLog`` (see ``access_log``). Raises ``ValueError`` for an
    unknown format or level.
    """
    global _access
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.handlers[:] = [handler]
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if _access is not None:
        _access.close()
    _access = AccessLog(
        handler.stream,
        fmt,
        level=logging.getLogger("gateway.access").getEffectiveLevel(),
        lock=handler.lock or None,
    )
    return handler


def access_log() -> AccessLog | None:
    """The access log ``setup_logging`` installed, or None before it ran."""
    return _access


def flush_access_log() -> None:
    """Wait until every access line so far is written (tests, shutdown)."""
    if _access is not None:
        _access.flush()


def close_access_log() -> None:
    """Flush and stop the access log; later access lines go through ``logging`` again."""
    global _access
    if _access is not None:
        _access.close()
        _access = None


atexit.register(close_access_log)
