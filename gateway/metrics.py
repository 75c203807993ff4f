"""Every metric of the gateway, declared once on an injected ``CollectorRegistry``.

Labels carry bounded values only (never a key, a body or a campaign id; a caller only as
one of the configured caller names or a built-in one). A
labelled series is created at start-up only where this configuration can produce it (no
``route="healthz",cache="HIT"``); the request series appear with their first request. The
process, platform and garbage-collector collectors of ``prometheus_client`` are registered too
(``process_*``, ``python_*``): memory against the container limit, CPU, open files, restarts.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import Final, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from gateway import __version__, vendor
from gateway.build import revision
from gateway.errors import GatewayError
from gateway.loop_metrics import LoopCounter, LoopHistogram, Tally, Timing

# From a sub-millisecond cache hit to the upstream timeout.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
UPSTREAM_OUTCOMES = (
    "ok",
    "business_error",
    "auth_rejected",
    "http_error",
    "timeout",
    "unavailable",
    "client_error",
    "rate_limited",
)
REJECTION_REASONS = ("queue_full", "queue_timeout", "breaker_open")
LOOKUP_RESULTS = ("hit", "stale", "miss", "error")
# The vendor's documented result codes; anything else is counted as "other".
RESULT_CODES = (*vendor.RESULT_CODES, "other", "none")
# The coalescer's Redis failures are logged by it, not counted: it falls back in-process.
REDIS_OPERATIONS = ("cache_get", "cache_put", "purge", "limiter", "ping")
STALE_REASONS = ("upstream_error", "overload", "revalidate")
# Callers every gateway has besides the configured ones (gateway/limiter/memory.py, handlers.py).
BUILTIN_CALLERS = ("anonymous", "other", "background")
REFRESH_RESULTS = ("ok", "skipped", "error")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
AUTH_FAILURES = ("missing_key", "unknown_key", "forbidden")
RELOAD_RESULTS = ("success", "failure")
# The ``code`` of an answer without a gateway error; ``parameter``: a vendor rule answered
# locally (HTTP 200 with the vendor's code); ``other``: an error of no known class.
NO_CODE, PARAMETER_CODE, OTHER_CODE = "none", "parameter", "other"
# Errors raised by aiohttp itself (routing, framing) before a handler could name the class.
_CODE_BY_STATUS = {400: "GW40000", 404: "GW40400", 405: "GW40500", 413: "GW41300", 500: "GW50000"}


def _error_codes(cls: type[GatewayError]) -> set[str]:
    found = {cls.code}
    for sub in cls.__subclasses__():
        found |= _error_codes(sub)
    return found


ERROR_CODES = frozenset(_error_codes(GatewayError))
# The answers of the callresult route without an X-Cache: (status class, code).
CALLRESULT_ERRORS = (
    ("2xx", PARAMETER_CODE),
    *(("4xx", code) for code in ("GW40000", "GW40100", "GW40300", "GW41300", "GW41500", "GW41700")),
    *(("5xx", code) for code in ("GW50000", "GW50200", "GW50201", "GW50202", "GW50300")),
    *(("5xx", code) for code in ("GW50301", "GW50302", "GW50400")),
)

K = TypeVar("K")
C = TypeVar("C")


# The kinds of answer (route, status, X-Cache, error code) whose series a replica remembers;
# past it the memo starts again (statuses come from the upstream: not a closed set).
_ANSWER_KINDS: Final = 1024


class _Children(dict[K, C], Generic[K, C]):
    """Label children bound on first use: ``labels()`` on every request would double what
    counting a request costs (about 2.7 µs instead of 1.2 µs)."""

    def __init__(self, make: Callable[[K], C]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: K) -> C:
        child = self[key] = self._make(key)
        return child


class GatewayMetrics:
    """``redis``/``cache``/``auth``: whether this configuration has them (their series exist
    or not)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        redis: bool = True,
        cache: bool = True,
        auth: bool = True,
    ) -> None:
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        # Counted on every request, on the event loop's thread: ``loop_metrics``.
        self.requests = LoopCounter(
            "isales_gateway_requests",
            "Requests answered, by route, HTTP status class, cache result and gateway code.",
            ["route", "status_class", "cache", "code"],
            registry,
        )
        self.request_duration = LoopHistogram(
            "isales_gateway_request_duration_seconds",
            "Time from request to response, by route and cache result.",
            ["route", "cache"],
            registry,
            buckets=LATENCY_BUCKETS,
        )
        self.cache_lookups = LoopCounter(
            "isales_gateway_cache_lookups", "Cache lookups by result.", ["result"], registry
        )
        self.upstream_requests = Counter(
            "isales_gateway_upstream_requests",
            "Requests sent to the upstream, by outcome and business result code.",
            ["outcome", "code"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "isales_gateway_upstream_retries",
            "Upstream attempts that were retries of a failed attempt.",
            registry=registry,
        )
        self.coalesced_wait = Histogram(
            "isales_gateway_coalesced_wait_seconds",
            "Time a caller waited for an identical in-flight call instead of calling itself.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "isales_gateway_redis_errors",
            "Redis operations that failed or timed out, by operation.",
            ["operation"],
            registry=registry,
        )
        self.degraded = Gauge(
            "isales_gateway_degraded",
            "1 while a component is degraded (redis: unreachable; this replica limits itself "
            "to its share max_concurrent/replicas, cache lookups fail and count as misses).",
            ["component"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "isales_gateway_upstream_breaker_state",
            "Upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=registry,
        )
        self.stale_served = Counter(
            "isales_gateway_stale_served",
            "Stale copies served, by why no fresh answer was given.",
            ["reason"],
            registry=registry,
        )
        self.build_info = Gauge(
            "isales_gateway_build_info",
            "Always 1; the labels say which build runs.",
            ["version", "revision", "python"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "isales_gateway_upstream_duration_seconds",
            "Upstream round-trip time (permit held).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.permits_in_flight = Gauge(
            "isales_gateway_permits_in_flight",
            "Upstream permits held by this replica.",
            registry=registry,
        )
        self.permits_max = Gauge(
            "isales_gateway_permits_max",
            "The configured upstream concurrency limit (the budget line).",
            registry=registry,
        )
        self.limit_window = Gauge(
            "isales_gateway_limit_window_seconds",
            "The configured start window plus margin: permits_max starts per this many seconds.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "isales_gateway_queue_depth",
            "Callers of this replica waiting for an upstream permit.",
            registry=registry,
        )
        self.fleet_permits_in_flight = Gauge(
            "isales_gateway_fleet_permits_in_flight",
            "Upstream permits in flight in the whole fleet, as the limiter counts them (NaN "
            "while this replica cannot read it).",
            registry=registry,
        )
        self.fleet_starts_in_window = Gauge(
            "isales_gateway_fleet_upstream_starts_in_window",
            "Upstream starts in the current window + margin in the whole fleet, as the limiter "
            "counts them (pending ones included; NaN while this replica cannot read it).",
            registry=registry,
        )
        self.queue_wait = Histogram(
            "isales_gateway_queue_wait_seconds",
            "Time a miss waited for its upstream permit.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            "isales_gateway_rejections",
            "Callers turned away without an upstream call, by reason.",
            ["reason"],
            registry=registry,
        )
        self.caller_requests = LoopCounter(
            "isales_gateway_caller_requests",
            "Requests on the callresult route, by caller (configured names, anonymous, other).",
            ["caller"],
            registry,
        )
        self.caller_upstream_calls = Counter(
            "isales_gateway_caller_upstream_calls",
            "Upstream permits taken, by the caller whose share paid (background: refresh-ahead).",
            ["caller"],
            registry=registry,
        )
        self.caller_queue_wait = Histogram(
            "isales_gateway_caller_queue_wait_seconds",
            "Time a miss waited for its upstream permit, by caller.",
            ["caller"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.caller_rejections = Counter(
            "isales_gateway_caller_rejections",
            "Callers turned away without a permit (queue_full, queue_timeout), by caller.",
            ["caller", "reason"],
            registry=registry,
        )
        self.refresh_ahead = Counter(
            "isales_gateway_refresh_ahead",
            "Refresh-ahead of popular entries on idle permits: ok, skipped (no idle permit), "
            "error.",
            ["result"],
            registry=registry,
        )
        for result in REFRESH_RESULTS:
            self.refresh_ahead.labels(result)
        self.caller_requests_by: dict[str, Tally] = {}
        self.observe_callers(())
        self.auth_failures = Counter(
            "isales_gateway_auth_failures",
            "Requests refused for their key: missing, unknown, or not allowed to do that.",
            ["reason"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "isales_gateway_config_reloads",
            "Reloads of the callers file and admin key (SIGHUP or file change), by result.",
            ["result"],
            registry=registry,
        )
        self.config_reload_time = Gauge(
            "isales_gateway_config_last_reload_success_timestamp_seconds",
            "When the keys in use were loaded (start-up or the last successful reload).",
            registry=registry,
        )
        self.callers = Gauge(
            "isales_gateway_callers",
            "Callers (API keys) in the callers file in use; 0 with authentication off.",
            registry=registry,
        )
        self.requests_by: _Children[tuple[str, str, str, str], Tally] = _Children(
            lambda k: self.requests.labels(*k)
        )
        self.request_duration_by: _Children[tuple[str, str], Timing] = _Children(
            lambda k: self.request_duration.labels(*k)
        )
        self.cache_lookups_by: _Children[str, Tally] = _Children(self.cache_lookups.labels)
        self._answered: dict[tuple[str, int, str, str | None], tuple[Tally, Timing]] = {}
        # The callresult answers this configuration can give exist from start-up, so the first
        # of each kind shows in rate(); other routes' series appear with their first request.
        answers = ("HIT", "MISS", "STALE", "COALESCED", "BYPASS") if cache else ("BYPASS",)
        for answer in answers:
            self.requests_by["callresult", "2xx", answer, NO_CODE].inc(0)
        for status, code in CALLRESULT_ERRORS:
            if auth or code not in ("GW40100", "GW40300"):
                self.requests_by["callresult", status, "NONE", code].inc(0)
        for answer in (*answers, "NONE"):
            _ = self.request_duration_by["callresult", answer]  # bound, so created
        if cache:
            for result in LOOKUP_RESULTS[:3] + (LOOKUP_RESULTS[3:] if redis else ()):
                self.cache_lookups_by[result].inc(0)
            for reason in STALE_REASONS:
                self.stale_served.labels(reason)
        for outcome in UPSTREAM_OUTCOMES:
            if outcome not in ("ok", "business_error"):
                self.upstream_requests.labels(outcome, "none")
        for code in RESULT_CODES[:-1]:  # "none" only goes with a failed call
            self.upstream_requests.labels(
                "ok" if code == vendor.SUCCESS else "business_error", code
            )
        if redis:
            for operation in REDIS_OPERATIONS:
                self.redis_errors.labels(operation)
            self.degraded.labels("redis").set(0)
        self.build_info.labels(__version__, revision(), platform.python_version()).set(1)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        for reason in AUTH_FAILURES if auth else ("missing_key", "forbidden"):  # admin routes
            self.auth_failures.labels(reason)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)

    def observe_request(
        self, route: str, status: int, cache: str, seconds: float, error: str | None = None
    ) -> None:
        """One answered request: counted by route, status class, cache result and code, timed.

        The code is ``error``, the gateway error's (``GW41500``...) that the request's trace
        recorded, else one that the status implies, else ``none``.
        """
        key = (route, status, cache, error)
        bound = self._answered.get(key)
        if bound is None:  # the labels of an answer of this kind, found once
            code = error_code_label(status, error)
            bound = (
                self.requests_by[route, status_class(status), cache, code],
                self.request_duration_by[route, cache],
            )
            if len(self._answered) >= _ANSWER_KINDS:
                self._answered.clear()
            self._answered[key] = bound
        counted, timed = bound
        counted.inc()
        timed.observe(seconds)

    def observe_callers(self, names: Iterable[str]) -> None:
        """Create every per-caller series for ``names`` (and the built-in callers) at zero."""
        for caller in (*BUILTIN_CALLERS, *names):
            self.caller_requests_by[caller] = self.caller_requests.labels(caller)
            self.caller_upstream_calls.labels(caller)
            self.caller_queue_wait.labels(caller)
            for reason in REJECTION_REASONS[:2]:
                self.caller_rejections.labels(caller, reason)

    def count_caller_request(self, caller: str) -> None:
        counter = self.caller_requests_by.get(caller)  # bound once: this is the hit path
        (counter or self.caller_requests.labels(caller)).inc()

    def observe_caller_permit(self, caller: str, waited: float) -> None:
        self.caller_upstream_calls.labels(caller).inc()
        self.caller_queue_wait.labels(caller).observe(waited)

    def observe_limiter(
        self,
        max_concurrent: int,
        window_s: float,
        in_flight: Callable[[], float],
        queued: Callable[[], float],
        fleet_in_flight: Callable[[], float],
        fleet_starts: Callable[[], float],
    ) -> None:
        """Read the limiter's gauges at scrape time instead of tracking every change."""
        self.permits_max.set(max_concurrent)
        self.limit_window.set(window_s)
        self.permits_in_flight.set_function(in_flight)
        self.queue_depth.set_function(queued)
        self.fleet_permits_in_flight.set_function(fleet_in_flight)
        self.fleet_starts_in_window.set_function(fleet_starts)


def result_code_label(code: str | None) -> str:
    """A bounded label for a vendor result code."""
    if code is None:
        return "none"
    return code if code in RESULT_CODES else "other"


def error_code_label(status: int, code: str | None) -> str:
    """A bounded label for the gateway code of an answer (``none`` for a normal one)."""
    if code is not None:
        return code if code in ERROR_CODES or code == PARAMETER_CODE else OTHER_CODE
    if status < 400:
        return NO_CODE
    return _CODE_BY_STATUS.get(status, OTHER_CODE)


def status_class(status: int) -> str:
    return "2xx" if status < 400 else "4xx" if status < 500 else "5xx"
