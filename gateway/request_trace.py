"""What one request spent where, for its access-log line.

The middleware starts a ``RequestTrace`` per request in a context variable; the upstream
caller fills it in. Context variables follow the request into the coalesced call's task (a
task copies the context of the request that created it), so the leader's log line carries
the queue wait and upstream time, and a follower's carries none.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from gateway.traceparent import outgoing_traceparent


@dataclass(slots=True)
class RequestTrace:
    vdn_id: int | None = None
    campaign_id: int | None = None
    queue_wait_ms: float | None = None
    upstream_ms: float | None = None
    attempts: int = 0
    # The gateway error this request was answered with (its code, e.g. GW50300), if any.
    error_code: str | None = None
    # A HIT or COALESCED answer: the X-Request-ID of the request whose upstream call it got.
    source_request_id: str | None = None
    # This request's X-Request-ID (forwarded upstream if it calls) and its API-key caller.
    request_id: str | None = None
    caller: str | None = None
    # The caller's ``traceparent`` header ("" without one); None: the request forwards none.
    incoming_traceparent: str | None = None
    _traceparent: str | None = None

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` this request forwards upstream, made on first use: a cache
        hit never pays for its random ids."""
        if self._traceparent is None and self.incoming_traceparent is not None:
            self._traceparent = outgoing_traceparent(self.incoming_traceparent or None)
        return self._traceparent

    @traceparent.setter
    def traceparent(self, value: str | None) -> None:
        self._traceparent = value


current: ContextVar[RequestTrace | None] = ContextVar("request_trace", default=None)
