"""The access log's fast path: one line per request, rendered directly, written off the loop.

Why not ``logging``: a ``LogRecord``, a filter and a formatter per request cost about 30 us, a
third of a cache hit (README "Performance"). ``AccessLog.request`` renders the line in the
configured format (the same shape ``logs.TextFormatter`` / ``logs.JsonFormatter`` give) and
appends it to a buffer; the buffer goes to a writer thread every ``FLUSH_S`` or every
``BATCH_LINES`` lines, so the event loop never waits on the stream. ``flush`` waits until
everything written so far is on the stream (tests, shutdown).

If the stream cannot keep up, chunks beyond ``MAX_PENDING`` are dropped and counted, and the
count is written when the stream catches up: a slow log pipe must not grow memory without
bound or stall callers.

Text lines are made unforgeable: every control character, line separator and lone surrogate
in a value (``%0A`` in a path arrives as a newline) is written as an escape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from queue import SimpleQueue
from typing import Any, Final, TextIO

FLUSH_S: Final = 0.05
BATCH_LINES: Final = 256
MAX_PENDING: Final = 1024  # chunks handed to the writer and not yet written
# C0 and C1 controls, DEL, the Unicode line separators and lone surrogates.
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEEDS_QUOTES: Final = re.compile('[\\s"=\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]')


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """``text`` with control characters, line separators and lone surrogates escaped."""
    if text.isprintable():  # each character escaped is one ``isprintable`` refuses; C-fast
        return text
    return _UNSAFE.sub(_escape_one, text) if _UNSAFE.search(text) else text


def logfmt(value: object) -> str:
    """A logfmt value: bare when safe, else quoted, and never spanning lines."""
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return escape_text(json.dumps(text, ensure_ascii=False))


_MEMO_SIZE: Final = 4096
_MEMO_MAX_LEN: Final = 512


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds; the part up to the second is reused, and the
    whole stamp within one millisecond (several lines share it under load)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._milli = -1
        self._stamp = ""

    def now(self) -> str:
        moment = time.time()
        milli = int(moment * 1000)
        if milli == self._milli:
            return self._stamp
        second = milli // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._stamp = f"{self._prefix}.{milli % 1000:03d}Z"
        return self._stamp


_LEVEL_NAMES: Final = {logging.DEBUG: "DEBUG", logging.INFO: "INFO"}
# The access line's fields, in order. ``request_id`` is checked or made by the middleware, the
# method is an HTTP token and the rest but the text ones are numbers or None: ``request``
# quotes only the fields a caller can choose.
ACCESS_FIELDS: Final = (
    "request_id",
    "caller",
    "client",
    "method",
    "path",
    "status",
    "cache",
    "source_request_id",
    "bytes",
    "vdn_id",
    "campaign_id",
    "queue_wait_ms",
    "upstream_ms",
    "upstream_attempts",
    "duration_ms",
    "user_agent",
    "service",
    "version",
)
AccessValues = tuple[
    str, str | None, str, str, str, int, str, str | None, int | None, int | None, int | None,
    float | None, float | None, int, float, str | None, str, str,
]  # fmt: skip


def access_message(values: AccessValues) -> str:
    """The access line's message: method, path, status, cache label and duration."""
    return f"{values[3]} {values[4]} {values[5]} {values[6]} {values[14]:.1f}ms"


class AccessLog:
    """Renders access lines in ``fmt`` ("text" or "json") and writes them to ``stream``.

    ``lock`` is held while writing, so lines never interleave with the ones a ``logging``
    handler writes to the same stream. Call ``close`` once at the end (flushes, stops the
    writer thread).
    """

    def __init__(
        self,
        stream: TextIO,
        fmt: str,
        *,
        level: int = logging.INFO,
        lock: AbstractContextManager[Any] | None = None,
        logger: str = "gateway.access",
    ) -> None:
        self.level = level
        self._is_text = fmt != "json"
        self._stream = stream
        self._lock = lock if lock is not None else nullcontext()
        self._logger = logger
        self._clock = _Clock()
        self._shapes: dict[tuple[Any, ...], tuple[str, str, str]] = {}
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._queue: SimpleQueue[tuple[str, threading.Event | None] | None] = SimpleQueue()
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def request(self, level: int, values: AccessValues) -> None:
        """Buffer one request's line, ``values`` in the order of ``ACCESS_FIELDS``; the writer
        thread writes it within ``FLUSH_S``.

        A text line is three parts remembered per request shape (everything but the id, the
        timings and the time: a hot route's lines share them), with the rest filled in; the
        parts quote only the values a caller can choose (the path, the user agent, the
        addresses, the caller name). This runs per request.
        """
        if not self._is_text:
            fields = dict(zip(ACCESS_FIELDS, values, strict=True))
            self._buffer(self._json(level, access_message(values), fields))
            return
        (rid, caller, client, method, path, status, cache, source, size, vdn, campaign,
         queue_ms, upstream_ms, attempts, duration, agent, service, version) = values  # fmt: skip
        shape = (level, caller, client, method, path, status, cache, source, size, vdn, campaign,
                 agent, service, version)  # fmt: skip
        parts = self._shapes.get(shape)
        if parts is None:
            parts = self._parts(shape)
        head, middle, tail = parts
        self._buffer(
            f"{self._clock.now()} {head}{duration:.1f}ms request_id={rid}{middle}"
            f" queue_wait_ms={queue_ms} upstream_ms={upstream_ms} upstream_attempts={attempts}"
            f" duration_ms={duration}{tail}"
        )

    def _parts(self, shape: tuple[Any, ...]) -> tuple[str, str, str]:
        """A text line's fixed parts for ``shape`` (``request``), remembered unless long (a
        crafted path or agent); the memo is emptied when full, so memory stays bounded."""
        (level, caller, client, method, path, status, cache, source, size, vdn, campaign,
         agent, service, version) = shape  # fmt: skip
        name = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        said = escape_text(f"{method} {path} {status} {cache} ")  # the message, but its time
        parts = (
            f"{name:<7} {self._logger} {said}",
            f" caller={logfmt(caller)} client={logfmt(client)} method={method}"
            f" path={logfmt(path)} status={status} cache={logfmt(cache)}"
            f" source_request_id={logfmt(source)} bytes={size} vdn_id={vdn} campaign_id={campaign}",
            f" user_agent={logfmt(agent)} service={service} version={logfmt(version)}",
        )
        if len(path) + len(agent or "") + len(caller or "") + len(client) <= _MEMO_MAX_LEN:
            if len(self._shapes) >= _MEMO_SIZE:
                self._shapes.clear()
            self._shapes[shape] = parts
        return parts

    def _buffer(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= BATCH_LINES:
            self._hand_off()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing will flush later, so now
                self._hand_off()
            else:
                self._timer = loop.call_later(FLUSH_S, self._hand_off)

    def flush(self) -> None:
        """Return once every line written so far is on the stream."""
        done = threading.Event()
        self._hand_off(done)
        if self._thread.is_alive():
            done.wait(5.0)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(5.0)

    def _hand_off(self, done: threading.Event | None = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines = self._lines
        chunk = "\n".join(lines) + "\n" if lines else ""
        lines.clear()
        if done is None and self._queue.qsize() >= MAX_PENDING:
            self._dropped += chunk.count("\n")
            return
        if self._dropped:
            note = f"access log: {self._dropped} lines dropped, the stream was too slow"
            warning = self._head if self._is_text else self._json
            chunk = warning(logging.WARNING, note) + "\n" + chunk
            self._dropped = 0
        self._queue.put((chunk, done))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chunk, done = item
            try:
                if chunk:
                    with self._lock:
                        self._stream.write(chunk)
                        self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: lines are lost
                pass
            finally:
                if done is not None:
                    done.set()

    def _head(self, level: int, message: str) -> str:
        name = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        return f"{self._clock.now()} {name:<7} {self._logger} {escape_text(message)}"

    def _json(self, level: int, message: str, fields: dict[str, Any] | None = None) -> str:
        entry = {
            "ts": self._clock.now(),
            "level": _LEVEL_NAMES.get(level) or logging.getLevelName(level),
            "logger": self._logger,
            "msg": message,
        }
        for key, value in (fields or {}).items():
            entry.setdefault(key, value)
        # ASCII escapes (the default): a lone surrogate from a crafted path cannot break the
        # encoder. No other argument: json.dumps reuses its cached encoder only without any.
        try:
            return json.dumps(entry)
        except (TypeError, ValueError):  # a value JSON has no form for
            return json.dumps(entry, default=str)
