"""Optional OpenTelemetry spans: one per request, with the queue wait, the coalescing wait and
the upstream call as children, exported over OTLP/HTTP.

Off by default: ``tracing.otlp_endpoint`` switches it on and needs the ``otel`` extra
(``pip install 'isales-gateway[otel]'``). The span context travels in a context variable,
so the upstream call made by a coalesced task (which copies the leader's context) is a child
of the leader's request span, and the ``traceparent`` sent upstream names that call's span.
Without the extra this module imports nothing from OpenTelemetry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from gateway import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

# The spans of the request being handled (None: tracing off).
active: ContextVar[RequestSpans | None] = ContextVar("otel_spans", default=None)


def available() -> bool:
    """Is the ``otel`` extra installed?"""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


class RequestSpans:
    """Creates the spans of requests; ``exporter`` defaults to OTLP/HTTP at ``endpoint``."""

    def __init__(
        self,
        endpoint: str = "",
        service_name: str = "isales-gateway",
        exporter: SpanExporter | None = None,
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processor: Any = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
        else:
            processor = SimpleSpanProcessor(exporter)
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("isales-gateway", __version__)
        self._propagator = TraceContextTextMapPropagator()

    @contextmanager
    def request(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The server span of one request, a child of the caller's ``traceparent`` if any."""
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(carrier={k.lower(): v for k, v in headers.items()})
        with self._tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
            token = active.set(self)
            try:
                yield span
            finally:
                active.reset(token)

    @contextmanager
    def upstream_call(self, queue_wait_ms: float | None) -> Iterator[dict[str, str]]:
        """The client span of one upstream attempt, and the headers that carry it upstream.

        The queue wait that preceded it (measured by the permit) becomes a span ending now.
        """
        from opentelemetry.trace import SpanKind

        if queue_wait_ms is not None:
            self.waited("queue wait", queue_wait_ms / 1000)
        with self._tracer.start_as_current_span("upstream call", kind=SpanKind.CLIENT):
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            yield carrier

    def waited(self, name: str, seconds: float, **attributes: str) -> None:
        """A span of ``seconds`` that ends now (a wait measured elsewhere)."""
        end = time.time_ns()
        span = self._tracer.start_span(name, start_time=end - int(seconds * 1e9))
        span.set_attributes(attributes)
        span.end(end_time=end)

    def shutdown(self) -> None:
        self._provider.shutdown()
