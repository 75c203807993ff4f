"""The upstream simulator: the vendor's contract, the limit observer and the named behaviours."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from gateway import signing
from gateway.clock import ManualClock
from gateway.simulator import (
    SIM_STATE,
    SimulatorConfig,
    add_arguments,
    config_from_args,
    create_simulator_app,
)
from gateway.simulator.dataset import generate_campaign
from gateway.simulator.observer import LimitObserver

AK = "test-ak"
SK = "test-sk"
CONFIG = SimulatorConfig(ak=AK, sk=SK)
SMALL = 11  # a campaign below the 2000 cap
BIG = 10  # every 10th campaign is above it

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_client(aiohttp_client: Any, clock: ManualClock) -> MakeClient:
    """A real-socket client of a fresh simulator on the test's ManualClock."""

    async def make(**changes: Any) -> Client:
        config = SimulatorConfig(**{"ak": AK, "sk": SK, **changes})
        client: Client = await aiohttp_client(create_simulator_app(config, clock=clock))
        return client

    return make


def path_of(campaign: int | str = SMALL, vdn: int | str = 1) -> str:
    return f"/rest/isales/v1/openapi/campaigns/{vdn}/callresult/{campaign}"


async def query(
    client: Client,
    clock: ManualClock,
    body: dict[str, Any] | bytes | None = None,
    *,
    campaign: int | str = SMALL,
    vdn: int | str = 1,
    sk: str = SK,
    signed_at: float | None = None,
    timestamp_format: signing.TimestampFormat = "seconds",
    signed: Sequence[str] = ("host",),
    content_type: str = "application/json;charset=UTF-8",
) -> ClientResponse:
    """POST a C2-signed query, with every signed header sent exactly as signed."""
    raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    path = path_of(campaign, vdn)
    headers = {
        "host": f"{client.server.host}:{client.server.port}",
        "content-type": content_type,
        "content-length": str(len(raw)),
    }
    stamp = signing.format_timestamp(
        clock.time() if signed_at is None else signed_at, timestamp_format
    )
    headers["authorization"] = signing.authorization(
        ak=AK,
        sk=sk,
        timestamp=stamp,
        method="POST",
        path=path,
        headers=headers,
        body=raw,
        signed_headers=signed,
    )
    return await client.post(path, data=raw, headers=headers)


async def rows_of(client: Client, clock: ManualClock, **body: Any) -> tuple[int, list[Any]]:
    resp = await query(client, clock, body)
    assert resp.status == 200
    doc = await resp.json()
    assert doc["resultCode"] == "0200000", doc
    return doc["totalCount"], doc["data"]


async def stats(client: Client) -> dict[str, Any]:
    resp = await client.get("/__sim/stats")
    result: dict[str, Any] = await resp.json()
    return result


async def until(condition: Callable[[], bool], limit_s: float = 1.0) -> None:
    """Wait (real time, bounded) for server-side state that has no event to await."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110 -- polling the simulator's own counters
            await asyncio.sleep(0.002)


# --- the vendor contract ------------------------------------------------------------------


async def test_a_correctly_signed_query_answers_success_in_the_vendor_shape(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    resp = await query(client, clock, {"pageSize": 5, "pageNum": 1})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json;charset=UTF-8"
    doc = await resp.json()
    assert list(doc) == [
        "resultCode", "resultDesc", "returnCode", "returnDesc", "totalCount", "data"
    ]  # fmt: skip
    assert (doc["resultCode"], doc["resultDesc"]) == ("0200000", "Query Success!")
    assert (doc["returnCode"], doc["returnDesc"]) == ("0200000", "Query Success!")
    assert len(doc["data"]) == 5
    item = doc["data"][0]
    assert list(item) == [
        "campaignId", "sessionId", "called", "callTimeStr", "callStatus",
        "failCode", "resultCode", "vdnId", "callId", "recordPath",
    ]  # fmt: skip
    assert item["campaignId"] == str(SMALL)
    assert item["vdnId"] == 1
    datetime.strptime(item["callTimeStr"], "%Y-%m-%d %H:%M:%S")
    assert (await stats(client))["auth_failures"] == 0


async def test_the_same_query_twice_gives_identical_bytes(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    first = await (await query(client, clock, {"showDetail": 1, "pageSize": 100})).read()
    second = await (await query(client, clock, {"showDetail": 1, "pageSize": 100})).read()
    assert first == second
    assert first.startswith(b'{"resultCode":"0200000","resultDesc":"Query Success!",')


async def test_two_simulators_with_the_same_seed_give_identical_bytes(
    make_client: MakeClient, clock: ManualClock
) -> None:
    one, two = await make_client(), await make_client()
    body = {"customField": "batch-B"}
    a = await (await query(one, clock, body, campaign=BIG)).read()
    b = await (await query(two, clock, body, campaign=BIG)).read()
    assert a == b


async def test_a_wrong_secret_key_is_answered_401_and_counted(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    resp = await query(client, clock, sk="not-the-secret")
    assert resp.status == 401
    doc = await resp.json()
    assert doc == {
        "resultCode": "0200401",
        "resultDesc": "Authentication failed: signature mismatch",
    }
    assert (await stats(client))["auth_failures"] == 1


async def test_a_stale_timestamp_is_answered_401(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(max_skew_s=900.0)
    resp = await query(client, clock, signed_at=clock.time() - 901)
    assert resp.status == 401
    assert "stale" in (await resp.json())["resultDesc"]
    assert (await query(client, clock, signed_at=clock.time() - 899)).status == 200


async def test_a_missing_authorization_is_answered_401(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    resp = await client.post(path_of(), data=b"{}", headers={"Content-Type": "application/json"})
    assert resp.status == 401
    assert (await stats(client))["auth_failures"] == 1


async def test_a_millisecond_timestamp_and_three_signed_headers_are_accepted(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    signed = ("content-length", "content-type", "host")
    resp = await query(client, clock, timestamp_format="milliseconds", signed=signed)
    assert resp.status == 200
    assert (await resp.json())["resultCode"] == "0200000"
    seen = client.app[SIM_STATE].received[-1]
    assert "/content-length;content-type;host/" in seen.headers["authorization"]
    assert ".000Z/" in seen.headers["authorization"]


async def test_a_content_type_other_than_json_is_answered_415(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    assert (await query(client, clock, content_type="text/plain")).status == 415
    assert (await query(client, clock, content_type="application/json")).status == 200


async def test_methods_other_than_post_are_answered_405(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.get(path_of())
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    ("body", "path_ids", "code"),
    [
        ({"pageSize": 600}, (1, SMALL), "02000007"),
        ({"pageSize": "10"}, (1, SMALL), "02000006"),
        ({"sessionId": "x" * 33}, (1, SMALL), "02000003"),
        ({"beginTime": "2026-06-01"}, (1, SMALL), "0200008"),
        ({"beginTime": "2026/06/01", "endTime": "2026-06-02"}, (1, SMALL), "0200009"),
        ({"beginTime": "2026-06-02", "endTime": "2026-06-01"}, (1, SMALL), "0200010"),
        ({"beginTime": "2026-05-01", "endTime": "2026-06-15"}, (1, SMALL), "0200011"),
        (b"{not json", (1, SMALL), "02000008"),
        ({}, (0, SMALL), "02000007"),
    ],
)
async def test_each_parameter_error_reaches_the_caller_with_the_vendor_code(
    make_client: MakeClient,
    clock: ManualClock,
    body: dict[str, Any] | bytes,
    path_ids: tuple[int, int],
    code: str,
) -> None:
    client = await make_client()
    resp = await query(client, clock, body, vdn=path_ids[0], campaign=path_ids[1])
    assert resp.status == 200
    doc = await resp.json()
    assert list(doc) == ["resultCode", "resultDesc", "returnCode", "returnDesc"]
    assert doc["resultCode"] == doc["returnCode"] == code
    assert doc["resultDesc"] == doc["returnDesc"]


async def test_a_campaign_beyond_the_configured_count_does_not_exist(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(campaigns=50)
    doc = await (await query(client, clock, campaign=51)).json()
    assert doc == {
        "resultCode": "0200007",
        "resultDesc": "The outbound campaign does not exist.",
        "returnCode": "0200007",
        "returnDesc": "The outbound campaign does not exist.",
    }
    assert (await (await query(client, clock, campaign=50)).json())["resultCode"] == "0200000"


# --- data, filters and paging -------------------------------------------------------------


async def test_pages_are_one_based_slices_of_the_same_total(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    total, everything = await rows_of(client, clock, pageSize=500, pageNum=1)
    assert 20 <= total <= 500
    assert len(everything) == total
    assert await rows_of(client, clock, pageSize=7, pageNum=2) == (total, everything[7:14])
    assert await rows_of(client, clock, pageSize=7) == (total, everything[:7])
    assert await rows_of(client, clock, pageSize=7, pageNum=10_000) == (total, [])


async def test_only_page_num_assumes_pages_of_100(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    expected = await rows_of(client, clock, showDetail=1, pageSize=100, pageNum=2)
    assert len(expected[1]) == 100
    assert await rows_of(client, clock, showDetail=1, pageNum=2) == expected


async def test_without_paging_a_big_campaign_returns_the_first_2000_rows(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    resp = await query(client, clock, {}, campaign=BIG)
    doc = await resp.json()
    assert doc["totalCount"] > 2000
    assert len(doc["data"]) == 2000
    assert doc["data"][0]["sessionId"] == f"{BIG}_000001"


async def test_show_detail_1_gives_one_row_per_attempt_and_0_the_last_attempt(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    finals_total, finals = await rows_of(client, clock, showDetail=0, pageSize=500)
    detail_total, _ = await rows_of(client, clock, showDetail=1, pageSize=100)
    assert detail_total > finals_total
    session = finals[3]["sessionId"]
    _, attempts = await rows_of(client, clock, showDetail=1, sessionId=session)
    assert attempts[-1] == finals[3]
    assert [a["callTimeStr"] for a in attempts] == sorted(a["callTimeStr"] for a in attempts)


async def test_session_id_filter_selects_one_subscriber(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    total, rows = await rows_of(client, clock, sessionId=f"{SMALL}_000002")
    assert total == len(rows) == 1
    assert rows[0]["sessionId"] == f"{SMALL}_000002"
    assert await rows_of(client, clock, sessionId="nobody") == (0, [])


async def test_custom_field_filter_partitions_the_subscribers(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    total, _ = await rows_of(client, clock)
    parts = [await rows_of(client, clock, customField=f"batch-{x}") for x in "ABCD"]
    assert sum(n for n, _ in parts) == total
    assert all(0 < n < total for n, _ in parts)


async def test_time_range_filter_keeps_calls_on_inclusive_dates(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    _, everything = await rows_of(client, clock)
    begin, end = "2026-06-01", "2026-06-10"
    total, rows = await rows_of(client, clock, beginTime=begin, endTime=end)
    expected = [r for r in everything if begin <= r["callTimeStr"][:10] <= end]
    assert 0 < total < len(everything)
    assert rows == expected


def test_generated_data_is_deterministic_plausible_and_bounded() -> None:
    today = date(2026, 6, 30)
    big = generate_campaign(7, 3, 20, today)
    assert big == generate_campaign(7, 3, 20, today)
    assert big != generate_campaign(8, 3, 20, today)
    assert 2000 < len(big) <= 3000
    assert 20 <= len(generate_campaign(7, 3, 21, today)) <= 600
    attempts = [a for s in big for a in s.attempts]
    assert len({a["callId"] for a in attempts}) == len(attempts)
    earliest = (today - timedelta(days=60)).isoformat()
    for a in attempts:
        assert earliest <= str(a["callTimeStr"]) < today.isoformat()
        assert len(str(a["sessionId"])) <= 32
        ok = a["callStatus"] == 6
        assert (a["failCode"] == "0") == ok
        assert (a["resultCode"] == "OB99999") == ok
        assert bool(a["recordPath"]) == ok


# --- the limit observer -------------------------------------------------------------------


def test_eleven_arrivals_within_one_second_are_one_violation() -> None:
    observer = LimitObserver(max_concurrent=10, window_s=1.0)
    for i in range(11):
        observer.arrive(i * 0.09)
        observer.depart()
    assert observer.violations == 1
    assert observer.max_starts_in_window == 11
    assert observer.max_in_flight == 1


def test_batches_of_ten_every_1_1_seconds_never_violate() -> None:
    observer = LimitObserver(max_concurrent=10, window_s=1.0)
    for batch in range(5):
        for _ in range(10):
            assert not observer.arrive(batch * 1.1)
        for _ in range(10):
            observer.depart()
    assert observer.violations == 0
    assert observer.max_starts_in_window == 10
    assert observer.max_in_flight == 10


def test_an_arrival_exactly_one_window_later_does_not_count_the_old_one() -> None:
    observer = LimitObserver(max_concurrent=1, window_s=1.0)
    observer.arrive(0.0)
    observer.depart()
    assert not observer.arrive(1.0)
    observer.depart()
    assert observer.arrive(1.5)  # (0.5, 1.5] holds 1.0 and 1.5


def test_eleven_in_flight_is_a_violation_even_when_starts_are_spread() -> None:
    observer = LimitObserver(max_concurrent=10, window_s=1.0)
    results = [observer.arrive(i * 0.5) for i in range(11)]
    assert results == [False] * 10 + [True]
    assert observer.max_in_flight == 11
    assert observer.max_starts_in_window <= 3


async def test_in_flight_covers_the_whole_request_on_the_simulator_clock(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(latency_ms=100)
    state = client.app[SIM_STATE]
    tasks = [asyncio.create_task(query(client, clock)) for _ in range(3)]
    await until(lambda: state.observer.in_flight == 3)
    clock.advance(0.1)
    assert [r.status for r in await asyncio.gather(*tasks)] == [200, 200, 200]
    doc = await stats(client)
    assert (doc["max_in_flight"], doc["in_flight"], doc["violations"]) == (3, 0, 0)
    assert doc["max_starts_in_window"] == 3


async def test_a_request_whose_client_goes_away_stops_counting_as_in_flight(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(timeout_rate=1.0, hang_s=60.0)
    state = client.app[SIM_STATE]
    task = asyncio.create_task(query(client, clock))
    await until(lambda: state.observer.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: state.observer.in_flight == 0)


async def test_without_enforcement_a_violation_is_counted_but_answered(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    statuses = [(await query(client, clock)).status for _ in range(11)]
    assert statuses == [200] * 11
    doc = await stats(client)
    assert (doc["violations"], doc["max_starts_in_window"]) == (1, 11)


async def test_with_enforcement_a_violating_request_is_answered_429(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(enforce_limits=True)
    statuses = [(await query(client, clock)).status for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    clock.advance(1.0)
    assert (await query(client, clock)).status == 200
    doc = await stats(client)
    assert doc["violations"] == 1
    assert doc["responses_by_status"] == {"200": 11, "429": 1}


async def test_reset_zeroes_every_counter_and_maximum(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    for _ in range(11):
        await query(client, clock)
    await query(client, clock, sk="wrong")
    before = await stats(client)
    assert before["requests_total"] == 12
    assert before["distinct_queries"] == 1
    doc = await (await client.post("/__sim/reset")).json()
    for key in ("requests_total", "max_in_flight", "max_starts_in_window", "violations"):
        assert doc[key] == 0, key
    assert (doc["auth_failures"], doc["distinct_queries"], doc["responses_by_status"]) == (0, 0, {})
    assert not client.app[SIM_STATE].received


async def test_the_received_requests_are_kept_for_in_process_assertions(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    await query(client, clock, {"pageSize": 3})
    seen = client.app[SIM_STATE].received[-1]
    assert (seen.method, seen.path, seen.body) == ("POST", path_of(), b'{"pageSize": 3}')
    assert seen.headers["host"] == f"{client.server.host}:{client.server.port}"


# --- named behaviours ---------------------------------------------------------------------


async def test_behaviour_error_rate_1_makes_every_request_fail_with_5xx(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    assert (await query(client, clock)).status == 200
    resp = await client.post("/__sim/behaviour", json={"error_rate": 1.0})
    assert resp.status == 200
    assert (await (await client.get("/__sim/behaviour")).json())["error_rate"] == 1.0
    failed = await query(client, clock)
    assert failed.status in (500, 503)
    assert await failed.json() == {"error": "simulated upstream failure"}


@pytest.mark.parametrize(
    "change",
    [{"error_rate": 1.5}, {"latency_ms": -1}, {"hang_s": "slow"}, {"colour": 1}, [1]],
)
async def test_behaviour_rejects_bad_input_with_400_and_changes_nothing(
    make_client: MakeClient, change: Any
) -> None:
    client = await make_client()
    before = await (await client.get("/__sim/behaviour")).json()
    assert (await client.post("/__sim/behaviour", json=change)).status == 400
    assert await (await client.get("/__sim/behaviour")).json() == before


async def test_timeout_rate_1_hangs_for_hang_s_then_answers(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(timeout_rate=1.0, hang_s=30.0)
    task = asyncio.create_task(query(client, clock))
    await until(lambda: client.app[SIM_STATE].observer.in_flight == 1)
    clock.advance(29.0)
    await asyncio.sleep(0.01)
    assert not task.done()
    clock.advance(1.0)
    assert (await task).status == 200


# --- configuration ------------------------------------------------------------------------


def test_command_line_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) == SimulatorConfig()
    ns = parser.parse_args(["--port", "0", "--error-rate", "0.5", "--enforce-limits"])
    config = config_from_args(ns)
    assert (config.port, config.error_rate, config.enforce_limits) == (0, 0.5, True)
    with pytest.raises(ValueError, match="error_rate"):
        config_from_args(parser.parse_args(["--error-rate", "2"]))
