"""The C2 signer against the vectors of shared/upstream/c2-signing.md."""

from __future__ import annotations

import pytest

from gateway import signing

AK = "globalaktest"
SK = "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p"
HOST = "10.22.26.181:28080"


def test_vector_a_post_callresult_signed_host_only() -> None:
    body = b'{"pageSize":100,"pageNum":1}'
    path = "/rest/isales/v1/openapi/campaigns/1/callresult/1001"
    assert signing.canonical_request("POST", path, {}, ["host"], {"host": HOST}, body) == (
        "POST\n/rest/isales/v1/openapi/campaigns/1/callresult/1001\nhost\n"
        "host:10.22.26.181%3A28080\n%7B%22pageSize%22%3A100%2C%22pageNum%22%3A1%7D"
    )
    prefix = f"auth-v2/{AK}/2024-10-31T14:06:52Z/host"
    assert signing.hmac_hex(SK, prefix) == (
        "c13a2c5e680eb409b84bb9c02b015016bb1b78900fd244105b8b47da277ae6f9"
    )
    assert signing.authorization(
        ak=AK,
        sk=SK,
        timestamp="2024-10-31T14:06:52Z",
        method="POST",
        path=path,
        headers={"host": HOST},
        body=body,
    ) == (
        "auth-v2/globalaktest/2024-10-31T14:06:52Z/host/"
        "7d09b58e50e2ec09c1c386c6c0bf6af17413a1fd9fd7e92e28dfc8e00cdba4ce"
    )


def test_vector_b_get_with_query_and_no_body_ends_with_newline() -> None:
    path = "/rest/isales/v1/openapi/campaigns/1/queryOBSResultCode"
    query = {"pageSize": "50", "pageNum": "1"}
    assert signing.canonical_request("GET", path, query, ["host"], {"host": HOST}, b"") == (
        f"GET\n{path}\npageNum=1&pageSize=50\nhost\nhost:10.22.26.181%3A28080\n"
    )
    assert signing.authorization(
        ak=AK,
        sk=SK,
        timestamp="2024-10-31T14:06:52Z",
        method="GET",
        path=path,
        headers={"host": HOST},
        body=b"",
        query=query,
    ) == (
        "auth-v2/globalaktest/2024-10-31T14:06:52Z/host/"
        "898e8e1955baf4d368332d8e58291cd45114abe0b1f8036fe1e2917968cd887d"
    )


def test_vector_c_three_signed_headers_and_millisecond_timestamp() -> None:
    body = b'{"say":"Hello world!"}'
    headers = {
        "host": HOST,
        "content-type": "application/json;charset=UTF-8",
        "content-length": "22",
    }
    signed = ["host", "content-type", "content-length"]
    prefix = f"auth-v2/{AK}/2024-10-31T14:06:52.123Z/content-length;content-type;host"
    assert signing.hmac_hex(SK, prefix) == (
        "e71e4070f0db5264bfa185ea096541ae59cd0c902a0d91f89774506ab451edfd"
    )
    assert signing.authorization(
        ak=AK,
        sk=SK,
        timestamp="2024-10-31T14:06:52.123Z",
        method="POST",
        path="/rest/cmsapp/v1/ping",
        headers=headers,
        body=body,
        signed_headers=signed,
    ) == (
        "auth-v2/globalaktest/2024-10-31T14:06:52.123Z/content-length;content-type;host/"
        "6bd988ff0f2a81692804f672f0894e861fdb20a981b1bf4954d8efddebb0ebca"
    )


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("seconds", "2024-10-31T14:06:52Z"), ("milliseconds", "2024-10-31T14:06:52.123Z")],
)
def test_timestamp_formats_round_trip(fmt: signing.TimestampFormat, expected: str) -> None:
    epoch = signing.parse_timestamp("2024-10-31T14:06:52.123Z")
    assert signing.format_timestamp(epoch, fmt) == expected
    assert abs(signing.parse_timestamp(expected) - epoch) < 1


def _signed(timestamp: str, sk: str = SK) -> str:
    return signing.authorization(
        ak=AK,
        sk=sk,
        timestamp=timestamp,
        method="POST",
        path="/p",
        headers={"host": HOST},
        body=b"{}",
    )


def _verify(value: str | None, now: float) -> str | None:
    return signing.verify(
        value,
        credentials={AK: SK},
        now=now,
        max_skew=300,
        method="POST",
        path="/p",
        headers={"host": HOST},
        body=b"{}",
    )


def test_verify_accepts_a_fresh_correct_signature() -> None:
    now = signing.parse_timestamp("2024-10-31T14:06:52Z")
    assert _verify(_signed("2024-10-31T14:06:52Z"), now + 10) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing Authorization"),
        ("Bearer x", "malformed Authorization header"),
        ("auth-v2/globalaktest/yesterday/host/abc", "not a C2 timestamp: 'yesterday'"),
        (_signed("2024-10-31T14:06:52Z", sk="wrong"), "signature mismatch"),
        (_signed("2024-10-31T13:00:00Z"), "stale timestamp"),
        ("auth-v2/otherak/2024-10-31T14:06:52Z/host/abc", "unknown AK"),
    ],
)
def test_verify_rejects_bad_signatures_with_a_reason(value: str | None, reason: str) -> None:
    now = signing.parse_timestamp("2024-10-31T14:06:52Z")
    assert _verify(value, now) == reason
