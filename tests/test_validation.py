"""The vendor's parameter rules: documented ones answered here, silent ones left to the vendor.

A rule the vendor's document states is answered by the gateway with the vendor code and costs
no upstream call, whatever ``validation.undocumented`` says. A request that breaks only a rule
the document is silent on goes to the vendor unchanged (``forward``, the default) or is
answered here (``reject``); both are tested on every silent case.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import ParameterError
from gateway.validation import CallResultQuery, parse_request, refuse_undocumented
from tests.conftest import (
    StartGateway,
    StartSimulator,
    Upstream,
    gateway_settings,
    signed_post,
)

BASE = "/rest/isales/v1/openapi/campaigns"

# (case, vdnId, campaignId, body, vendor code)
REJECTED: list[tuple[str, str, str, Any, str]] = [
    ("vdnId below 1", "0", "3", {}, "02000007"),
    ("vdnId above 9999", "10000", "3", {}, "02000007"),
    ("vdnId not a number", "abc", "3", {}, "02000006"),
    ("vdnId negative", "-1", "3", {}, "02000006"),
    ("campaignId not a number", "11", "x1", {}, "02000006"),
    ("campaignId beyond int32", "11", "2147483648", {}, "02000007"),
    ("sessionId of 33 characters", "11", "3", {"sessionId": "s" * 33}, "02000003"),
    ("customField an object", "11", "3", {"customField": {"a": 1}}, "02000006"),
    ("pageSize 101 with showDetail 1", "11", "3", {"pageSize": 101, "showDetail": 1}, "02000007"),
    ("pageSize 501 with showDetail 0", "11", "3", {"pageSize": 501}, "02000007"),
    ("pageSize huge", "11", "3", {"pageSize": 10**30}, "02000007"),
    ("pageSize a boolean", "11", "3", {"pageSize": True}, "02000006"),
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
    ("body a JSON array", "11", "3", [1, 2], "02000006"),
    ("body a JSON string", "11", "3", "hello", "02000006"),
    ("pageSize a word", "11", "3", {"pageSize": "ten"}, "02000006"),
    ("pageNum an object", "11", "3", {"pageNum": {"n": 1}}, "02000006"),
    ("customField a list", "11", "3", {"customField": ["a"]}, "02000006"),
    (
        "sessionId of 17 emoji: 34 UTF-16 units",
        "11",
        "3",
        {"sessionId": "\U0001f600" * 17},
        "02000003",
    ),
    (
        "beginTime a number",
        "11",
        "3",
        {"beginTime": 20260101, "endTime": "2026-01-02"},
        "02000006",
    ),
    (
        "endTime with a trailing newline",
        "11",
        "3",
        {"beginTime": "2026-01-01", "endTime": "2026-01-02\n"},
        "0200009",
    ),
    ("pageSize 600 beside an unknown field", "11", "3", {"pageSize": 600, "x": 1}, "02000007"),
]

# Silent in the document: (case, campaignId, raw body, the code "reject" answers with)
SILENT: list[tuple[str, str, bytes, str]] = [
    ("an unknown field", "3", b'{"pageSize": 5, "pagesize": 5}', "0200001"),
    ("only an unknown field", "3", b'{"__proto__": {"pageSize": 5}}', "0200001"),
    ("pageSize a string of digits", "3", b'{"pageSize": "100"}', "02000006"),
    ("pageNum a string of digits", "3", b'{"pageSize": 5, "pageNum": "2"}', "02000006"),
    ("showDetail a string of digits", "3", b'{"showDetail": "1", "pageSize": 5}', "02000006"),
    ("pageSize 10.0", "3", b'{"pageSize": 10.0}', "02000006"),
    ("pageSize 10.5", "3", b'{"pageSize": 10.5}', "02000006"),
    ("pageSize 1e2", "3", b'{"pageSize": 1e2}', "02000006"),
    ("sessionId a number", "3", b'{"sessionId": 12}', "02000006"),
    ("customField a boolean", "3", b'{"customField": true}', "02000006"),
    ("sessionId empty", "3", b'{"sessionId": ""}', "02000001"),
    ("customField empty", "3", b'{"customField": ""}', "02000001"),
    ("both dates empty", "3", b'{"beginTime": "", "endTime": ""}', "02000001"),
    ("pageSize 0", "3", b'{"pageSize": 0}', "02000007"),
    ("pageSize negative", "3", b'{"pageSize": -5}', "02000007"),
    ("pageNum 0", "3", b'{"pageSize": 5, "pageNum": 0}', "02000007"),
    ("pageNum negative", "3", b'{"pageNum": -1}', "02000007"),
    ("duplicate keys, the last one 0", "3", b'{"pageSize": 5, "pageSize": 0}', "02000007"),
    ("campaignId 0", "0", b'{"pageSize": 5}', "02000007"),
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


@pytest.mark.parametrize(
    ("campaign", "raw", "code"),
    [case[1:] for case in SILENT],
    ids=[case[0] for case in SILENT],
)
def test_a_query_breaking_only_an_undocumented_rule_keeps_the_callers_body(
    campaign: str, raw: bytes, code: str
) -> None:
    query = parse_request("11", campaign, raw)
    assert query.verbatim == raw
    assert query.body_bytes() == raw
    assert query.silent is not None
    assert query.silent[0] == code
    with pytest.raises(ParameterError) as caught:
        refuse_undocumented(query)
    assert caught.value.vendor_code == code


def test_a_documented_rule_wins_over_an_undocumented_one() -> None:
    with pytest.raises(ParameterError) as caught:
        parse_request("11", "3", b'{"pagesize": 5, "pageSize": 501}')
    assert caught.value.vendor_code == "02000007"


def test_a_session_id_is_measured_in_utf16_units_as_java_does() -> None:
    assert parse_request("11", "3", json.dumps({"sessionId": "\U0001f600" * 16}).encode())
    assert parse_request("11", "3", json.dumps({"sessionId": "\u4e2d" * 32}).encode())
    with pytest.raises(ParameterError):
        parse_request("11", "3", json.dumps({"sessionId": "\U0001f600" * 16 + "a"}).encode())


def test_a_body_in_another_declared_charset_is_read_in_it_and_sent_as_utf8() -> None:
    gbk = '{"sessionId": "中文"}'.encode("gbk")
    assert parse_request("11", "3", gbk, charset="GBK").session_id == "中文"
    latin = '{"sessionId": "café", "x": 1}'.encode("latin-1")
    silent = parse_request("11", "3", latin, charset="iso-8859-1")
    assert silent.verbatim == '{"sessionId": "café", "x": 1}'.encode()
    for charset, raw in (("no-such-charset", b"{}"), ("base64", b"e30="), ("utf-8", b"\xff")):
        with pytest.raises(ParameterError) as caught:
            parse_request("11", "3", raw, charset=charset)
        assert caught.value.vendor_code == "02000008", charset
    with pytest.raises(ParameterError):
        parse_request("11", "3", gbk)  # undeclared: UTF-8, which these bytes are not


def test_a_valid_query_is_canonical_whatever_the_key_order_and_defaults() -> None:
    one = parse_request("011", "3", b'{"pageNum": 1, "pageSize": 20}')
    two = parse_request(
        "11", "3", b'{"pageSize": 20, "showDetail": 0, "pageNum": 1, "sessionId": null}'
    )
    assert one == two == CallResultQuery(11, 3, page_size=20, page_num=1, show_detail=0)
    assert one.verbatim is None
    assert one.body_bytes() == b'{"pageSize":20,"pageNum":1,"showDetail":0}'


def test_thirty_days_apart_and_an_empty_body_are_valid() -> None:
    query = parse_request("11", "3", b'{"beginTime": "2026-01-01", "endTime": "2026-01-31"}')
    assert query.body()["endTime"] == "2026-01-31"
    assert parse_request("11", "3", b"") == CallResultQuery(11, 3)


@pytest.mark.parametrize("mode", ["forward", "reject"])
async def test_the_gateway_answers_every_documented_rule_locally_with_zero_upstream_requests(
    upstream: Upstream, start_gateway: StartGateway, mode: str
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url, validation__undocumented=mode))
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


async def test_forward_sends_every_silent_case_unchanged_and_passes_the_vendors_answer_on(
    upstream: Upstream, start_gateway: StartGateway, start_simulator: StartSimulator
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))  # forward is the default
    reference = await start_simulator()  # same seed and data: what the vendor answers
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    for n, (name, campaign, raw, _) in enumerate(SILENT, start=1):
        path = f"{BASE}/11/callresult/{campaign}"
        response = await gateway.post(path, data=raw, headers=headers)
        assert response.status == 200, name
        assert upstream.requests == n, name
        seen = upstream.state.received[-1]
        assert (seen.path, seen.body) == (path, raw), name
        assert await response.read() == await signed_post(reference, path, raw), name
    assert upstream.state.auth_failures == 0


async def test_reject_answers_every_silent_case_locally_with_zero_upstream_requests(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    settings = gateway_settings(upstream.url, validation__undocumented="reject")
    gateway = await start_gateway(settings)
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    for name, campaign, raw, code in SILENT:
        response = await gateway.post(f"{BASE}/11/callresult/{campaign}", data=raw, headers=headers)
        body = await response.json()
        assert (response.status, body["resultCode"], body["returnCode"]) == (200, code, code), name
    assert upstream.requests == 0


async def test_identical_silent_bodies_share_a_cache_entry_and_differ_from_the_canonical_one(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    path = f"{BASE}/11/callresult/3"
    first = await gateway.post(
        path, data=b'{"pageSize": "5"}', headers={"Content-Type": "application/json"}
    )
    again = await gateway.post(
        path, data=b'{ "pageSize" : "5" }', headers={"Content-Type": "application/json"}
    )
    typed = await gateway.post(path, json={"pageSize": 5})
    assert [r.headers["X-Cache"] for r in (first, again, typed)] == ["MISS", "HIT", "MISS"]
    assert upstream.requests == 2


def test_the_gateway_and_the_simulator_written_apart_agree_on_the_vendors_codes() -> None:
    """``gateway/vendor.py`` and the simulator are each written from the vendor's document;
    every code the simulator can answer is one the gateway knows, under the same meaning."""
    from gateway import vendor
    from gateway.simulator import rules

    assert rules.SUCCESS == vendor.SUCCESS == vendor.RESULT_CODES[0]
    pairs = [
        (rules.PARAMETER, vendor.PARAMETER_ERROR),
        (rules.NO_CAMPAIGN, vendor.CAMPAIGN_NOT_FOUND),
        (rules.TIME_PAIR, vendor.TIME_PAIR),
        (rules.TIME_FORMAT, vendor.TIME_FORMAT),
        (rules.TIME_ORDER, vendor.TIME_ORDER),
        (rules.TIME_SPAN, vendor.TIME_SPAN),
        (rules.EMPTY, vendor.EMPTY),
        (rules.TOO_LONG, vendor.TOO_LONG),
        (rules.BAD_VALUE, vendor.WRONG_VALUE),
        (rules.CONVERSION, vendor.CONVERSION),
    ]
    assert [simulator for simulator, _ in pairs] == [gateway for _, gateway in pairs]
    assert len(set(vendor.RESULT_CODES)) == len(vendor.RESULT_CODES) == 18  # Table 6 + success
    assert rules.INT_MAX == vendor.MAX_INT
    assert rules.ENGLISH in vendor.LOCALES
