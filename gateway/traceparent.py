"""W3C Trace Context (``traceparent``): accept a caller's, pass it on to the upstream.

Pure. A valid incoming header keeps its trace id and flags, and the upstream call gets a new
parent id (the gateway's hop); a missing or invalid one starts a new trace, so every upstream
request carries a ``traceparent`` that its access-log line names.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_HEADER = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str
    parent_id: str
    flags: str = "00"

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse(value: str | None) -> TraceParent | None:
    """The caller's trace context, or None if absent or not valid W3C (never an error)."""
    if not value:
        return None
    match = _HEADER.match(value.strip().lower())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return TraceParent(trace_id, parent_id, flags)


def outgoing_traceparent(incoming: str | None, span_id: str | None = None) -> str:
    """The ``traceparent`` to send upstream: the caller's trace, this hop as the parent."""
    parent = parse(incoming)
    span = span_id or secrets.token_hex(8)
    if parent is None:
        return TraceParent(secrets.token_hex(16), span).header()
    return TraceParent(parent.trace_id, span, parent.flags).header()
