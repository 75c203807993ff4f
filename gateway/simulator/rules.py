"""How the simulated vendor reads a request: binding like a Java server, then its own rules.

Written from the vendor's document (``shared/upstream/callresult-api.txt``) on its own: the
simulator shares no code with the gateway's validation, so where the two guess differently
at the vendor's behaviour, tests see it. Pure: no I/O.

The vendor's stack is Java. The simulator reads the body the way Spring with Jackson's
defaults would: unknown fields are ignored; an integer field takes ``10``, ``"10"``,
``10.0`` (and ``10.7`` as 10); a string field takes a number or boolean as its text; ``null``
is absent; anything that cannot be converted (an object where a number belongs, ``true``
for an integer, ``NaN``, a number beyond a Java int, a body that is not a JSON object or not
UTF-8) is a conversion error (02000008). Then the vendor's rules: an empty string 02000001,
``sessionId`` over 32 UTF-16 units 02000003, ``pageSize`` 1..500 (1..100 with showDetail 1),
``pageNum`` >= 1 and ``showDetail`` 0/1 (02000007), and the documented date codes 0200008-11.
Path ids: not an integer 02000008, ``vdnId`` outside 1..9999 02000007.

Descriptions come in the caller's ``locale``: ``zh_CN`` (the vendor's default) or ``en_US``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

SUCCESS: Final = "0200000"
PARAMETER: Final = "0200001"
NO_CAMPAIGN: Final = "0200007"
TIME_PAIR: Final = "0200008"
TIME_FORMAT: Final = "0200009"
TIME_ORDER: Final = "0200010"
TIME_SPAN: Final = "0200011"
EMPTY: Final = "02000001"
TOO_LONG: Final = "02000003"
BAD_VALUE: Final = "02000007"
CONVERSION: Final = "02000008"

ENGLISH: Final = "en_US"
# code -> (zh_CN, en_US); the English texts are the document's.
MESSAGES: Final = {
    SUCCESS: ("查询成功!", "Query Success!"),
    PARAMETER: ("参数错误。", "Parameter error."),
    NO_CAMPAIGN: ("外呼活动不存在。", "The outbound campaign does not exist."),
    TIME_PAIR: (
        "开始时间和结束时间必须同时指定或同时为空。",
        "The start time and end time must be specified or left empty at the same time.",
    ),
    TIME_FORMAT: (
        "开始时间或结束时间格式不正确。",
        "The format of the start time or end time is incorrect.",
    ),
    TIME_ORDER: (
        "开始时间晚于或等于结束时间。",
        "The start time is later than or equal to the end time.",
    ),
    TIME_SPAN: (
        "开始时间和结束时间的间隔超过30天。",
        "The interval between the start time and end time exceeds 30 days.",
    ),
    EMPTY: ("参数为空。", "Empty parameter."),
    TOO_LONG: (
        "参数长度不能超过最大长度。",
        "The parameter length cannot exceed the maximum length.",
    ),
    BAD_VALUE: ("参数值不正确。", "Incorrect parameter value."),
    CONVERSION: (
        "参数转换错误，请检查请求参数。",
        "Parameter conversion error. Check the request parameters.",
    ),
}

INT_MIN: Final = -(2**31)
INT_MAX: Final = 2**31 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def describe(code: str, locale: str | None, field: str | None = None) -> str:
    """The vendor's description of ``code`` in ``locale``, naming ``field`` if there is one."""
    chinese, english = MESSAGES[code]
    text = english if locale == ENGLISH else chinese
    return text if field is None else f"{text} ({field})"


class Refusal(Exception):
    """The vendor refuses the request with ``code`` (HTTP 200); ``field`` names the culprit."""

    def __init__(self, code: str, field: str | None = None) -> None:
        super().__init__(code, field)
        self.code = code
        self.field = field


@dataclass(frozen=True, slots=True)
class Query:
    """A request the vendor accepted, after binding and its rules."""

    vdn_id: int
    campaign_id: int
    session_id: str | None = None
    custom_field: str | None = None
    page_size: int | None = None
    page_num: int | None = None
    show_detail: int = 0
    begin: date | None = None
    end: date | None = None


def _java_int(text: str, field: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise Refusal(CONVERSION, field)
    value = int(text[:12])  # longer is beyond an int anyway; never int() thousands of digits
    if len(text) > 12 or not INT_MIN <= value <= INT_MAX:
        raise Refusal(CONVERSION, field)
    return value


def _bind_int(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None  # Jackson: null, and an empty string coerced to null
    if isinstance(value, bool | dict | list):
        raise Refusal(CONVERSION, field)
    if isinstance(value, float):
        if not INT_MIN <= value <= INT_MAX:
            raise Refusal(CONVERSION, field)
        return int(value)  # toward zero, as Java's (int) cast
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise Refusal(CONVERSION, field)
        return value
    return _java_int(str(value), field)


def _bind_str(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict | list):
        raise Refusal(CONVERSION, field)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON number {name}")


def read_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of the body (UTF-8, strict JSON), or ``Refusal``; empty is ``{}``."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refusal(CONVERSION) from exc
    if not isinstance(value, dict):
        raise Refusal(CONVERSION)
    return value


def _day(text: str, field: str) -> date:
    if not _DAY.fullmatch(text):
        raise Refusal(TIME_FORMAT, field)
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise Refusal(TIME_FORMAT, field) from exc


def read_query(vdn_text: str, campaign_text: str, raw: bytes) -> Query:
    """The request as the vendor accepts it, or ``Refusal`` with the vendor's code."""
    vdn_id = _java_int(vdn_text, "vdnId")
    campaign_id = _java_int(campaign_text, "campaignId")
    if not 1 <= vdn_id <= 9999:
        raise Refusal(BAD_VALUE, "vdnId")
    body = read_body(raw)
    session_id = _bind_str(body.get("sessionId"), "sessionId")
    custom_field = _bind_str(body.get("customField"), "customField")
    page_size = _bind_int(body.get("pageSize"), "pageSize")
    page_num = _bind_int(body.get("pageNum"), "pageNum")
    show_detail = _bind_int(body.get("showDetail"), "showDetail")
    begin_text = _bind_str(body.get("beginTime"), "beginTime")
    end_text = _bind_str(body.get("endTime"), "endTime")

    for field, text in (
        ("sessionId", session_id),
        ("customField", custom_field),
        ("beginTime", begin_text),
        ("endTime", end_text),
    ):
        if text == "":
            raise Refusal(EMPTY, field)
    # Java's String.length(): UTF-16 code units.
    if session_id is not None and len(session_id.encode("utf-16-le")) // 2 > 32:
        raise Refusal(TOO_LONG, "sessionId")
    detail = 0 if show_detail is None else show_detail
    if detail not in (0, 1):
        raise Refusal(BAD_VALUE, "showDetail")
    if page_size is not None and not 1 <= page_size <= (100 if detail == 1 else 500):
        raise Refusal(BAD_VALUE, "pageSize")
    if page_num is not None and page_num < 1:
        raise Refusal(BAD_VALUE, "pageNum")
    if (begin_text is None) != (end_text is None):
        raise Refusal(TIME_PAIR)
    begin = end = None
    if begin_text is not None and end_text is not None:
        begin, end = _day(begin_text, "beginTime"), _day(end_text, "endTime")
        if begin >= end:
            raise Refusal(TIME_ORDER)
        if (end - begin).days > 30:
            raise Refusal(TIME_SPAN)
    return Query(
        vdn_id, campaign_id, session_id, custom_field, page_size, page_num, detail, begin, end
    )
