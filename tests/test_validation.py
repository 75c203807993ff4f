"""Every vendor parameter rule: answered by the gateway, with the vendor code, no upstream call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import ParameterError
from gateway.validation import CallResultQuery, parse_request
from tests.conftest import StartGateway, Upstream, gateway_settings

BASE = "/rest/isales/v1/openapi/campaigns"

# (case, vdnId, campaignId, body, vendor code)
REJECTED: list[tuple[str, str, str, Any, str]] = [
    ("vdnId below 1", "0", "3", {}, "02000007"),
    ("vdnId above 9999", "10000", "3", {}, "02000007"),
    ("vdnId not a number", "abc", "3", {}, "02000006"),
    ("vdnId negative", "-1", "3", {}, "02000006"),
    ("campaignId not a number", "11", "x1", {}, "02000006"),
    ("campaignId zero", "11", "0", {}, "02000007"),
    ("campaignId beyond int32", "11", "2147483648", {}, "02000007"),
    ("sessionId of 33 characters", "11", "3", {"sessionId": "s" * 33}, "02000003"),
    ("sessionId empty", "11", "3", {"sessionId": ""}, "02000001"),
    ("sessionId a number", "11", "3", {"sessionId": 12}, "02000006"),
    ("customField an object", "11", "3", {"customField": {"a": 1}}, "02000006"),
    ("pageSize 101 with showDetail 1", "11", "3", {"pageSize": 101, "showDetail": 1}, "02000007"),
    ("pageSize 501 with showDetail 0", "11", "3", {"pageSize": 501}, "02000007"),
    ("pageSize 0", "11", "3", {"pageSize": 0}, "02000007"),
    ("pageSize negative", "11", "3", {"pageSize": -5}, "02000007"),
    ("pageSize huge", "11", "3", {"pageSize": 10**30}, "02000007"),
    ("pageSize a string", "11", "3", {"pageSize": "100"}, "02000006"),
    ("pageSize a boolean", "11", "3", {"pageSize": True}, "02000006"),
    ("pageSize a float", "11", "3", {"pageSize": 10.5}, "02000006"),
    ("pageNum zero", "11", "3", {"pageNum": 0}, "02000007"),
    ("pageNum a string", "11", "3", {"pageNum": "1"}, "02000006"),
    ("showDetail 2", "11", "3", {"showDetail": 2}, "02000007"),
    ("showDetail a boolean", "11", "3", {"showDetail": False}, "02000006"),
    ("beginTime without endTime", "11", "3", {"beginTime": "2026-01-01"}, "0200008"),
    ("endTime without beginTime", "11", "3", {"endTime": "2026-01-02"}, "0200008"),
    (
        "beginTime not YYYY-MM-DD",
        "11",
        "3",
        {"beginTime": "2026/01/01", "endTime": "2026-01-02"},
        "0200009",
    ),
    (
        "endTime not a real date",
        "11",
        "3",
        {"beginTime": "2026-01-01", "endTime": "2026-02-30"},
        "0200009",
    ),
    (
        "beginTime with a time part",
        "11",
        "3",
        {"beginTime": "2026-01-01 00:00:00", "endTime": "2026-01-02"},
        "0200009",
    ),
    (
        "begin equal to end",
        "11",
        "3",
        {"beginTime": "2026-01-02", "endTime": "2026-01-02"},
        "0200010",
    ),
    ("begin after end", "11", "3", {"beginTime": "2026-01-03", "endTime": "2026-01-02"}, "0200010"),
    ("31 days apart", "11", "3", {"beginTime": "2026-01-01", "endTime": "2026-02-01"}, "0200011"),
    ("an unknown field", "11", "3", {"pageSize": 5, "pagesize": 5}, "0200001"),
    ("body a JSON array", "11", "3", [1, 2], "02000006"),
    ("body a JSON string", "11", "3", "hello", "02000006"),
]

RAW_REJECTED: list[tuple[str, bytes, str]] = [
    ("body not JSON", b"{pageSize: 5}", "02000008"),
    ("body not UTF-8", b'{"sessionId": "\xff\xfe"}', "02000008"),
    ("body a number with 5000 digits", b'{"pageSize": ' + b"9" * 5000 + b"}", "02000008"),
]


@pytest.mark.parametrize(
    ("vdn", "campaign", "body", "code"),
    [case[1:] for case in REJECTED],
    ids=[case[0] for case in REJECTED],
)
def test_a_query_breaking_a_rule_gets_the_vendor_code(
    vdn: str, campaign: str, body: Any, code: str
) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_request(vdn, campaign, json.dumps(body).encode())
    assert caught.value.vendor_code == code
    assert caught.value.status == 200


def test_a_valid_query_is_canonical_whatever_the_key_order_and_defaults() -> None:
    one = parse_request("011", "3", b'{"pageNum": 1, "pageSize": 20}')
    two = parse_request(
        "11", "3", b'{"pageSize": 20, "showDetail": 0, "pageNum": 1, "sessionId": null}'
    )
    assert one == two == CallResultQuery(11, 3, page_size=20, page_num=1, show_detail=0)
    assert one.body_bytes() == b'{"pageSize":20,"pageNum":1,"showDetail":0}'


def test_thirty_days_apart_and_an_empty_body_are_valid() -> None:
    query = parse_request("11", "3", b'{"beginTime": "2026-01-01", "endTime": "2026-01-31"}')
    assert query.body()["endTime"] == "2026-01-31"
    assert parse_request("11", "3", b"") == CallResultQuery(11, 3)


async def test_the_gateway_answers_every_rule_locally_with_zero_upstream_requests(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    cases = [
        (name, f"{BASE}/{v}/callresult/{c}", json.dumps(b).encode(), code)
        for name, v, c, b, code in REJECTED
    ]
    cases += [(name, f"{BASE}/11/callresult/3", raw, code) for name, raw, code in RAW_REJECTED]
    for name, path, raw, code in cases:
        response = await gateway.post(path, data=raw, headers=headers)
        body = await response.json()
        assert (response.status, body["resultCode"], body["returnCode"]) == (200, code, code), name
        assert body["resultDesc"], name
    assert upstream.requests == 0
