"""The upstream simulator: the vendor's contract, the limit observer and the named behaviours.

Requests are signed with the gateway's signer (``gateway.signing``): the simulator checks
them with its own code, written from the vendor's description, so the two must agree.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
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
    c2,
    config_from_args,
    create_simulator_app,
)
from gateway.simulator.dataset import (
    DOCUMENT_SEED,
    FAILURES,
    RUNNING_EVERY,
    generate_campaign,
)
from gateway.simulator.observer import LimitObserver
from tests.support.waiting import until

AK = "test-ak"
SK = "test-sk"
CONFIG = SimulatorConfig(ak=AK, sk=SK)
VDN = 11  # every campaign belongs to VDN 11 by default
SMALL = 11  # a campaign below the 2000 cap, finished
BIG = 10  # every 10th campaign is above it
RUNNING = 12  # every 4th campaign is still dialling
assert RUNNING % RUNNING_EVERY == 0
assert SMALL % RUNNING_EVERY != 0
assert BIG % RUNNING_EVERY != 0

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


def path_of(campaign: int | str = SMALL, vdn: int | str = VDN) -> str:
    return f"/rest/isales/v1/openapi/campaigns/{vdn}/callresult/{campaign}"


async def query(
    client: Client,
    clock: ManualClock,
    body: dict[str, Any] | bytes | None = None,
    *,
    campaign: int | str = SMALL,
    vdn: int | str = VDN,
    sk: str = SK,
    signed_at: float | None = None,
    timestamp_format: signing.TimestampFormat = "seconds",
    signed: Sequence[str] = ("host",),
    content_type: str = "application/json;charset=UTF-8",
    locale: str | None = None,
    prefix: str = "",
) -> ClientResponse:
    """POST a C2-signed query, with every signed header sent exactly as signed."""
    raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    path = prefix + path_of(campaign, vdn)
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
    if locale is not None:
        headers["locale"] = locale
    return await client.post(path, data=raw, headers=headers)


async def rows_of(
    client: Client, clock: ManualClock, campaign: int = SMALL, **body: Any
) -> tuple[int, list[Any]]:
    resp = await query(client, clock, body, campaign=campaign)
    assert resp.status == 200
    doc = await resp.json()
    assert doc["resultCode"] == "0200000", doc
    return doc["totalCount"], doc["data"]


async def stats(client: Client) -> dict[str, Any]:
    resp = await client.get("/__sim/stats")
    result: dict[str, Any] = await resp.json()
    return result


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
    # Descriptions in the vendor's default locale, zh_CN.
    assert (doc["resultCode"], doc["resultDesc"]) == ("0200000", "查询成功!")
    assert (doc["returnCode"], doc["returnDesc"]) == ("0200000", "查询成功!")
    assert len(doc["data"]) == 5
    item = doc["data"][0]
    assert list(item) == [
        "campaignId", "sessionId", "called", "callTimeStr", "callStatus",
        "failCode", "resultCode", "vdnId", "callId", "recordPath",
    ]  # fmt: skip
    assert item["campaignId"] == str(SMALL)
    assert item["vdnId"] == VDN
    datetime.strptime(item["callTimeStr"], "%Y-%m-%d %H:%M:%S")
    assert (await stats(client))["auth_failures"] == 0


async def test_the_same_query_twice_gives_identical_bytes(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    first = await (await query(client, clock, {"showDetail": 1, "pageSize": 100})).read()
    second = await (await query(client, clock, {"showDetail": 1, "pageSize": 100})).read()
    assert first == second
    assert first.startswith('{"resultCode":"0200000","resultDesc":"查询成功!",'.encode())


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
        ({"pageSize": 600}, (VDN, SMALL), "02000007"),
        ({"pageSize": 101, "showDetail": 1}, (VDN, SMALL), "02000007"),
        ({"pageSize": 0}, (VDN, SMALL), "02000007"),
        ({"pageNum": 0}, (VDN, SMALL), "02000007"),
        ({"showDetail": 2}, (VDN, SMALL), "02000007"),
        ({"pageSize": True}, (VDN, SMALL), "02000008"),
        ({"pageSize": {"a": 1}}, (VDN, SMALL), "02000008"),
        ({"pageNum": 2**31}, (VDN, SMALL), "02000008"),
        ({"pageSize": "ten"}, (VDN, SMALL), "02000008"),
        ({"sessionId": ["a"]}, (VDN, SMALL), "02000008"),
        ({"sessionId": ""}, (VDN, SMALL), "02000001"),
        ({"customField": ""}, (VDN, SMALL), "02000001"),
        ({"sessionId": "x" * 33}, (VDN, SMALL), "02000003"),
        ({"sessionId": "\U0001f600" * 17}, (VDN, SMALL), "02000003"),
        ({"beginTime": "2026-06-01"}, (VDN, SMALL), "0200008"),
        ({"beginTime": "2026/06/01", "endTime": "2026-06-02"}, (VDN, SMALL), "0200009"),
        ({"beginTime": "2026-06-02", "endTime": "2026-06-01"}, (VDN, SMALL), "0200010"),
        ({"beginTime": "2026-05-01", "endTime": "2026-06-15"}, (VDN, SMALL), "0200011"),
        (b"{not json", (VDN, SMALL), "02000008"),
        (b'{"pageSize": NaN}', (VDN, SMALL), "02000008"),
        (b"[1]", (VDN, SMALL), "02000008"),
        (b'{"sessionId": "\xff"}', (VDN, SMALL), "02000008"),
        ({}, (0, SMALL), "02000007"),
        ({}, ("x", SMALL), "02000008"),
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
    doc = await (await query(client, clock, campaign=51, locale="en_US")).json()
    assert doc == {
        "resultCode": "0200007",
        "resultDesc": "The outbound campaign does not exist.",
        "returnCode": "0200007",
        "returnDesc": "The outbound campaign does not exist.",
    }
    assert (await (await query(client, clock, campaign=50)).json())["resultCode"] == "0200000"
    chinese = await (await query(client, clock, campaign=51)).json()
    assert (chinese["resultCode"], chinese["resultDesc"]) == ("0200007", "外呼活动不存在。")


# --- data, filters and paging -------------------------------------------------------------


async def test_pages_are_one_based_slices_of_the_same_total(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    total, everything = await rows_of(client, clock, pageSize=500, pageNum=1)
    assert total >= 20
    assert len(everything) == min(total, 500)
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
    _, first_page = await rows_of(client, clock, campaign=BIG, pageSize=500)
    assert doc["data"][:500] == first_page


def in_time_order(rows: list[Any]) -> bool:
    keys = [(r["callTimeStr"], r["callId"]) for r in rows]
    return keys == sorted(keys)


async def test_rows_come_in_time_order_whatever_the_filter(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    for body in ({"showDetail": 0}, {"showDetail": 1, "pageSize": 100}, {"customField": "batch-C"}):
        _, rows = await rows_of(client, clock, **body)
        assert len(rows) > 10
        assert in_time_order(rows), body


async def test_show_detail_1_gives_every_call_and_0_each_records_last_call(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    finals_total, finals = await rows_of(client, clock, showDetail=0, pageSize=500)
    detail_total, _ = await rows_of(client, clock, showDetail=1, pageSize=1)
    assert detail_total > finals_total
    for final in finals[:20]:
        _, calls = await rows_of(client, clock, showDetail=1, sessionId=final["sessionId"])
        assert final in calls
        assert in_time_order(calls)
        _, session_finals = await rows_of(client, clock, sessionId=final["sessionId"])
        assert all(f in calls for f in session_finals)
        assert calls[-1] in session_finals, "the latest call is always a final"


async def test_a_session_id_can_have_several_final_rows_like_the_documents_sample(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    _, finals = await rows_of(client, clock, showDetail=0, pageSize=500)
    counts: dict[str, int] = {}
    for row in finals:
        counts[row["sessionId"]] = counts.get(row["sessionId"], 0) + 1
    twice = [session for session, n in counts.items() if n == 2]
    assert twice, "some subscribers were loaded twice"
    total, rows = await rows_of(client, clock, sessionId=twice[0])
    assert total == len(rows) == 2
    assert {r["sessionId"] for r in rows} == {twice[0]}
    assert await rows_of(client, clock, sessionId="nobody") == (0, [])


async def test_custom_field_filter_partitions_the_final_rows(
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


async def test_a_running_campaign_grows_as_the_simulator_clock_runs_and_a_closed_range_does_not(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()  # today 2026-06-30: the simulated day starts at 00:00
    closed = {"beginTime": "2026-06-01", "endTime": "2026-06-29", "showDetail": 1, "pageSize": 100}
    open_total, open_rows = await rows_of(client, clock, campaign=RUNNING, showDetail=1)
    closed_before = await rows_of(client, clock, campaign=RUNNING, **closed)
    finished_before = await rows_of(client, clock, campaign=SMALL, showDetail=1)
    assert all(r["callTimeStr"] < "2026-06-30" for r in open_rows)

    clock.advance(2 * 3600)
    grown_total, grown = await rows_of(client, clock, campaign=RUNNING, showDetail=1)
    assert grown_total > open_total
    new = [r for r in grown if r not in open_rows]
    assert new
    assert all("2026-06-30 00:00:00" <= r["callTimeStr"] <= "2026-06-30 02:00:00" for r in new)
    assert in_time_order(grown)
    assert await rows_of(client, clock, campaign=RUNNING, **closed) == closed_before
    assert await rows_of(client, clock, campaign=SMALL, showDetail=1) == finished_before


async def test_a_campaign_belongs_to_one_vdn_and_another_vdn_gets_0200007(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(vdn_ids=(11, 12))
    for campaign, owner, other in ((1, 11, 12), (2, 12, 11), (3, 11, 12)):
        mine = await (await query(client, clock, campaign=campaign, vdn=owner)).json()
        assert mine["resultCode"] == "0200000"
        assert {row["vdnId"] for row in mine["data"]} == {owner}
        theirs = await (await query(client, clock, campaign=campaign, vdn=other)).json()
        assert theirs["resultCode"] == "0200007", (campaign, other)
    default = await make_client()
    assert (await (await query(default, clock, vdn=1)).json())["resultCode"] == "0200007"


async def test_fail_codes_are_the_vendors_published_five_digit_codes_or_0_on_success(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    _, rows = await rows_of(client, clock, campaign=BIG, showDetail=1, pageSize=100)
    codes = {row["failCode"] for row in rows}
    assert codes <= {"0", "00531", "00537", "01040", "34601"}
    assert len(codes) == 5
    for row in rows:
        assert (row["failCode"] == "0") == (row["callStatus"] == 6)
        assert row["resultCode"] == (
            "OB99999" if row["callStatus"] == 6 else FAILURES[row["failCode"]]
        )


DOCUMENT_SAMPLE_ANSWER = b"""{
  "resultCode":"0200000",
  "resultDesc":"Query Success!",
  "returnCode":"0200000",
  "returnDesc":"Query Success!",
  "totalCount": 2,
  "data": [
      {
        "campaignId": "3",
        "sessionId": "1202_test013",
        "called": "60584",
        "callTimeStr": "2020-08-30 20:00:00",
        "callStatus": 6,
        "failCode": "0",
        "resultCode": "OB99999",
        "vdnId": 11,
        "callId": "0023-134864174",
        "recordPath": "Y:/1/11/20200830/3408/0949218.V3"
      },
      {
        "campaignId": "3",
        "sessionId": "1202_test013",
        "called": "60584",
        "callTimeStr": "2020-08-30 20:05:00",
        "callStatus": 6,
        "failCode": "0",
        "resultCode": "OB99999",
        "vdnId": 11,
        "callId": "0023-134864893",
        "recordPath": "Y:/1/11/20200830/3408/0942113.V3"
      }
    ]
}"""  # copied from the vendor's document, spacing and all


async def test_the_documents_sample_answer_is_reproduced_with_the_document_seed(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(seed=DOCUMENT_SEED)
    sample_request = {"sessionId": "1202_test013", "pageSize": 500, "pageNum": 1}
    resp = await query(client, clock, sample_request, campaign=3, locale="en_US")
    got = await resp.read()
    expected = json.loads(DOCUMENT_SAMPLE_ANSWER)
    assert json.loads(got) == expected
    compact = json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
    assert got == compact, "same keys in the same order"


def test_generated_data_is_deterministic_plausible_and_bounded() -> None:
    today = date(2026, 6, 30)
    big = generate_campaign(7, 3, 20, today)
    assert big == generate_campaign(7, 3, 20, today)
    assert big != generate_campaign(8, 3, 20, today)
    sessions = {call.row["sessionId"] for call in big.calls}
    assert 2000 < len(sessions) <= 3000
    assert len({c.row["callId"] for c in big.calls}) == len(big.calls)
    earliest = (today - timedelta(days=60)).isoformat()
    for call in big.calls:
        row = call.row
        assert earliest <= call.at == row["callTimeStr"] < "2026-06-30 04:00:00"
        assert len(str(row["sessionId"])) <= 32
        ok = row["callStatus"] == 6
        assert (row["failCode"] == "0") == ok
        assert (row["resultCode"] == "OB99999") == ok
        assert bool(row["recordPath"]) == ok
    assert any(call.at >= today.isoformat() for call in big.calls), "20 is a running campaign"
    finished = generate_campaign(7, 3, 21, today)
    assert all(call.at < today.isoformat() for call in finished.calls)


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
    # A round trip through the simulator's loop after the advance: a timer due at 29 s would
    # have woken the query first.
    assert (await stats(client))["in_flight"] == 1
    assert not task.done()
    clock.advance(1.0)
    assert (await task).status == 200


# --- written from the vendor's document, not from the gateway ---------------------------

SIMULATOR_DIR = Path(__file__).resolve().parents[1] / "gateway" / "simulator"
FORBIDDEN = ("gateway.validation", "gateway.signing")


def imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_simulator_imports_neither_the_gateways_validation_nor_its_signing() -> None:
    files = sorted(SIMULATOR_DIR.glob("*.py"))
    assert len(files) >= 8
    for file in files:
        imported = imported_modules(file.read_text(encoding="utf-8"))
        bad = {
            name for name in imported for f in FORBIDDEN if name == f or name.startswith(f + ".")
        }
        assert not bad, f"{file.name} imports {bad}"
        gateway_parts = {n for n in imported if n.startswith("gateway.")}
        assert gateway_parts <= {
            "gateway.clock",
            "gateway.clock.Clock",
            "gateway.clock.SystemClock",
        } | {n for n in gateway_parts if n.startswith("gateway.simulator")}, file.name


def test_the_import_check_catches_each_way_of_importing() -> None:
    for line in (
        "from gateway import validation",
        "import gateway.signing",
        "from gateway.validation import parse_request",
        "from gateway.signing import verify as v",
    ):
        imported = imported_modules(line)
        assert any(name.startswith(FORBIDDEN) for name in imported), line


# The C2 document's test vectors (shared/upstream/c2-signing.md), checked by the simulator.
VECTOR_AK, VECTOR_SK = "globalaktest", "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p"
VECTORS = [
    (
        "A",
        "POST",
        "/rest/isales/v1/openapi/campaigns/1/callresult/1001",
        [],
        {"host": "10.22.26.181:28080"},
        b'{"pageSize":100,"pageNum":1}',
        "auth-v2/globalaktest/2024-10-31T14:06:52Z/host/"
        "7d09b58e50e2ec09c1c386c6c0bf6af17413a1fd9fd7e92e28dfc8e00cdba4ce",
    ),
    (
        "B",
        "GET",
        "/rest/isales/v1/openapi/campaigns/1/queryOBSResultCode",
        [("pageSize", "50"), ("pageNum", "1")],
        {"host": "10.22.26.181:28080"},
        b"",
        "auth-v2/globalaktest/2024-10-31T14:06:52Z/host/"
        "898e8e1955baf4d368332d8e58291cd45114abe0b1f8036fe1e2917968cd887d",
    ),
    (
        "C",
        "POST",
        "/rest/cmsapp/v1/ping",
        [],
        {
            "host": "10.22.26.181:28080",
            "content-type": "application/json;charset=UTF-8",
            "content-length": "22",
        },
        b'{"say":"Hello world!"}',
        "auth-v2/globalaktest/2024-10-31T14:06:52.123Z/content-length;content-type;host/"
        "6bd988ff0f2a81692804f672f0894e861fdb20a981b1bf4954d8efddebb0ebca",
    ),
]


@pytest.mark.parametrize("vector", VECTORS, ids=[v[0] for v in VECTORS])
def test_the_simulator_accepts_the_documents_signature_vectors_and_nothing_else(
    vector: tuple[str, str, str, list[tuple[str, str]], dict[str, str], bytes, str],
) -> None:
    _, method, path, query_pairs, headers, body, header = vector
    issued = datetime(2024, 10, 31, 14, 6, 52, tzinfo=UTC).timestamp()
    common: dict[str, Any] = {
        "secrets": {VECTOR_AK: VECTOR_SK},
        "now": issued,
        "max_skew_s": 900,
        "method": method,
        "query": query_pairs,
        "headers": headers,
    }
    assert c2.check(header, path=path, body=body, **common) is None
    assert c2.check(header, path=path + "1", body=body, **common) == "signature mismatch"
    assert c2.check(header, path=path, body=body + b" ", **common) == "signature mismatch"


def test_the_gateways_signer_and_the_simulators_check_agree_on_random_requests() -> None:
    rng = random.Random(11)
    alphabet = 'aZ09-._~ %/?&=:;+"{}\u00e9\u4e2d\U0001f600'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        signed = sorted(
            [*rng.sample(["content-length", "content-type"], rng.randint(0, 2)), "host"]
        )
        headers = {
            "host": f"10.0.0.{rng.randint(1, 254)}:{rng.randint(1, 65535)}",
            "content-type": rng.choice(["application/json", "application/json;charset=UTF-8"]),
            "content-length": str(rng.randint(0, 999)),
        }
        path = path_of(rng.randint(1, 99), rng.randint(1, 9999))
        body = json.dumps({"sessionId": text}, ensure_ascii=rng.random() < 0.5).encode()
        stamp = signing.format_timestamp(
            1_700_000_000 + rng.random() * 1e6, rng.choice(["seconds", "milliseconds"])
        )
        header = signing.authorization(
            ak="k", sk=text or "s", timestamp=stamp, method="POST", path=path,
            headers=headers, body=body, signed_headers=signed,
        )  # fmt: skip
        now = c2.stamp_seconds(stamp)
        assert now is not None
        reason = c2.check(
            header, secrets={"k": text or "s"}, now=now, max_skew_s=1, method="POST",
            path=path, query=[], headers=headers, body=body,
        )  # fmt: skip
        assert reason is None, (header, path, headers, body)


async def test_a_signature_that_does_not_cover_host_is_answered_401(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    resp = await query(client, clock, signed=("content-type",))
    assert resp.status == 401
    assert (await resp.json())["resultDesc"] == "Authentication failed: host is not a signed header"
    assert (await query(client, clock, signed=("content-type", "host"))).status == 200


async def test_undocumented_shapes_are_read_as_a_java_server_reads_them(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    reference = await (await query(client, clock, {"pageSize": 10})).json()
    for body in (
        {"pageSize": "10"},
        {"pageSize": 10.0},
        {"pageSize": 10.7},
        {"pageSize": 10, "pagesize": 3},
    ):
        doc = await (await query(client, clock, body)).json()
        assert doc == reference, body
    by_number = await (await query(client, clock, {"sessionId": 12})).json()
    assert (by_number["resultCode"], by_number["totalCount"]) == ("0200000", 0)


async def test_descriptions_follow_the_locale_header_zh_cn_by_default(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    chinese, english = "参数值不正确。 (pageSize)", "Incorrect parameter value. (pageSize)"
    cases = [(None, chinese), ("zh_CN", chinese), ("en_US", english), ("fr_FR", chinese)]
    for locale, text in cases:
        doc = await (await query(client, clock, {"pageSize": 0}, locale=locale)).json()
        assert (doc["resultCode"], doc["resultDesc"], doc["returnDesc"]) == ("02000007", text, text)
    ok = await (await query(client, clock, locale="en_US")).json()
    assert ok["resultDesc"] == "Query Success!"


async def test_a_sessionid_is_measured_in_utf16_units_as_java_does(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    for session, code in (
        ("\U0001f600" * 16, "0200000"),
        ("\u4e2d" * 32, "0200000"),
        ("\U0001f600" * 16 + "a", "02000003"),
    ):
        doc = await (await query(client, clock, {"sessionId": session})).json()
        assert doc["resultCode"] == code, session


async def test_behaviour_status_answers_that_status_with_retry_after_on_429(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client()
    for status in (400, 403, 404):
        await client.post("/__sim/behaviour", json={"status": status})
        resp = await query(client, clock)
        assert resp.status == status
        assert await resp.json() == {
            "resultCode": f"0200{status}",
            "resultDesc": f"Simulated HTTP {status}",
        }
    await client.post("/__sim/behaviour", json={"status": 429, "retry_after_s": 7})
    limited = await query(client, clock)
    assert (limited.status, limited.headers["Retry-After"]) == (429, "7")
    await client.post("/__sim/behaviour", json={"status": 0, "login_page": True})
    page = await query(client, clock)
    assert page.status == 200
    assert page.content_type == "text/html"
    assert b"<form" in await page.read()


async def test_the_route_can_be_mounted_under_a_path_prefix(
    make_client: MakeClient, clock: ManualClock
) -> None:
    client = await make_client(path_prefix="/isales")
    resp = await query(client, clock, prefix="/isales")
    assert (resp.status, (await resp.json())["resultCode"]) == (200, "0200000")
    assert client.app[SIM_STATE].received[-1].path == "/isales" + path_of()
    assert (await query(client, clock)).status == 404


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
    placed = config_from_args(parser.parse_args(["--vdn-ids", "11,12", "--path-prefix", "/p"]))
    assert (placed.vdn_ids, placed.path_prefix) == ((11, 12), "/p")
    assert (placed.owner(1), placed.owner(2), placed.owner(3)) == (11, 12, 11)
    for flags in (["--vdn-ids", "0"], ["--path-prefix", "p/"]):
        with pytest.raises(ValueError, match=r"vdn_ids|path_prefix"):
            config_from_args(parser.parse_args(flags))
