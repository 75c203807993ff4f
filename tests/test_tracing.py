"""OpenTelemetry spans (the optional extra): request, queue wait, coalescing wait, upstream."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.otel import RequestSpans
from gateway.settings import load_settings
from gateway.traceparent import parse
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.fleet import path
from tests.support.waiting import until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def test_a_request_span_continues_the_callers_trace_and_the_upstream_gets_its_call_span(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start_gateway(
        gateway_settings(upstream.url), spans=RequestSpans(exporter=exporter)
    )
    response = await gateway.post(
        path(3), json={}, headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    )
    assert response.status == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    (received,) = upstream.state.received
    sent = parse(received.headers["traceparent"])

    assert set(spans) == {"POST callresult", "queue wait", "upstream call"}
    request, call = spans["POST callresult"], spans["upstream call"]
    assert request.context is not None
    assert call.context is not None
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert request.parent is not None
    assert f"{request.parent.span_id:016x}" == CALLER_SPAN
    assert call.parent is not None
    assert call.parent.span_id == request.context.span_id
    assert spans["queue wait"].parent == call.parent, "the wait is the request's, before the call"
    assert sent is not None
    assert (sent.trace_id, sent.parent_id) == (TRACE_ID, f"{call.context.span_id:016x}")


async def test_a_coalesced_request_records_its_wait_and_the_leader(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(latency_ms=300)
    exporter = InMemorySpanExporter()
    gateway = await start_gateway(
        gateway_settings(upstream.url), spans=RequestSpans(exporter=exporter)
    )
    leader = asyncio.ensure_future(gateway.post(path(5), json={}, headers={"X-Request-ID": "L1"}))
    await until(lambda: upstream.requests == 1, "the leader's call is at the upstream")
    follower = await gateway.post(path(5), json={})
    await leader

    assert follower.headers["X-Cache"] == "COALESCED"
    (wait,) = [s for s in exporter.get_finished_spans() if s.name == "coalescing wait"]
    assert wait.attributes is not None
    assert wait.attributes["isales.leader_request_id"] == "L1"
    assert upstream.requests == 1


def test_tracing_is_off_by_default_and_an_endpoint_is_a_valid_setting() -> None:
    env = {
        "GATEWAY_UPSTREAM__URL": "https://vendor.example",
        "GATEWAY_UPSTREAM__AK": "ak",
        "GATEWAY_UPSTREAM__SK": "sk",
        "GATEWAY_AUTH__ENABLED": "false",
    }
    assert load_settings(None, env).tracing.otlp_endpoint == ""
    endpoint = "http://collector:4318/v1/traces"
    on = load_settings(None, env | {"GATEWAY_TRACING__OTLP_ENDPOINT": endpoint})
    assert on.tracing.otlp_endpoint == endpoint
