"""Validate and canonicalize a callresult query, with the vendor's rules and codes.

Pure: no I/O, no clock. The gateway answers every rule here locally (no upstream slot); the
simulator applies the same rules because they are the vendor's interface document
(``shared/upstream/callresult-api.txt``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

from gateway.errors import ParameterError

PARAMETER_ERROR: Final = "0200001"
CAMPAIGN_NOT_FOUND: Final = "0200007"
TIME_PAIR: Final = "0200008"
TIME_FORMAT: Final = "0200009"
TIME_ORDER: Final = "0200010"
TIME_SPAN: Final = "0200011"
EMPTY: Final = "02000001"
TOO_LONG: Final = "02000003"
WRONG_TYPE: Final = "02000006"
WRONG_VALUE: Final = "02000007"
CONVERSION: Final = "02000008"

MAX_INT: Final = 2**31 - 1
MAX_SESSION_ID: Final = 32
MAX_PAGE_SIZE: Final = {0: 500, 1: 100}
MAX_SPAN_DAYS: Final = 30

_DIGITS = re.compile(r"[0-9]+")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_INT_FIELDS = ("pageSize", "pageNum", "showDetail")
_STR_FIELDS = ("sessionId", "customField", "beginTime", "endTime")
KNOWN_FIELDS: Final = frozenset(_INT_FIELDS + _STR_FIELDS)


@dataclass(frozen=True, slots=True)
class CallResultQuery:
    """A valid query; ``show_detail`` has its default filled, other absent fields are None."""

    vdn_id: int
    campaign_id: int
    session_id: str | None = None
    custom_field: str | None = None
    page_size: int | None = None
    page_num: int | None = None
    show_detail: int = 0
    begin_time: date | None = None
    end_time: date | None = None

    def body(self) -> dict[str, Any]:
        """The request body in the vendor's field names, absent fields left out."""
        fields: dict[str, Any] = {
            "sessionId": self.session_id,
            "customField": self.custom_field,
            "pageSize": self.page_size,
            "pageNum": self.page_num,
            "showDetail": self.show_detail,
            "beginTime": self.begin_time.isoformat() if self.begin_time else None,
            "endTime": self.end_time.isoformat() if self.end_time else None,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def body_bytes(self) -> bytes:
        """The canonical body: compact, fixed key order; what is signed and sent upstream."""
        return json.dumps(self.body(), ensure_ascii=False, separators=(",", ":")).encode()

    @property
    def path(self) -> str:
        return f"/rest/isales/v1/openapi/campaigns/{self.vdn_id}/callresult/{self.campaign_id}"


def parse_path_id(name: str, text: str, low: int, high: int) -> int:
    """A path parameter as an integer in [low, high]."""
    if not _DIGITS.fullmatch(text):  # fullmatch: "$" would let a trailing newline through
        raise ParameterError(WRONG_TYPE, f"{name} must be an integer.")
    digits = text.lstrip("0") or "0"
    # More than 10 significant digits is beyond every range here; never int() thousands.
    value = int(digits) if len(digits) <= 10 else high + 1
    if not low <= value <= high:
        raise ParameterError(WRONG_VALUE, f"{name} must be between {low} and {high}.")
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; an empty body is an empty query."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
        if b"\\u" in raw:
            # A lone surrogate escape ("\ud800") parses but has no UTF-8 form: it would fail
            # later, when the query is encoded for the upstream or quoted in an error.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise ParameterError(CONVERSION, "Request body is not valid UTF-8 JSON.") from exc
    if not isinstance(value, dict):
        raise ParameterError(WRONG_TYPE, "Request body must be a JSON object.")
    return value


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(WRONG_TYPE, f"{name} must be an integer.")
    if not 0 <= value <= MAX_INT:
        raise ParameterError(WRONG_VALUE, f"{name} is out of range.")
    return value


def _str_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParameterError(WRONG_TYPE, f"{name} must be a string.")
    if value == "":
        raise ParameterError(EMPTY, f"{name} must not be empty.")
    return value


def _date_field(name: str, text: str) -> date:
    if not _DATE.match(text):
        raise ParameterError(TIME_FORMAT, f"{name} must be YYYY-MM-DD.")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ParameterError(TIME_FORMAT, f"{name} is not a valid date.") from exc


def validate_query(vdn_id: int, campaign_id: int, body: dict[str, Any]) -> CallResultQuery:
    """Apply every documented rule; raise ``ParameterError`` with the vendor's code."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise ParameterError(PARAMETER_ERROR, f"Unknown parameter: {unknown[0][:64]}.")
    ints = {name: _int_field(body, name) for name in _INT_FIELDS}
    strs = {name: _str_field(body, name) for name in _STR_FIELDS}

    show_detail = 0 if ints["showDetail"] is None else ints["showDetail"]
    if show_detail not in MAX_PAGE_SIZE:
        raise ParameterError(WRONG_VALUE, "showDetail must be 0 or 1.")
    page_size = ints["pageSize"]
    if page_size is not None and not 1 <= page_size <= MAX_PAGE_SIZE[show_detail]:
        raise ParameterError(
            WRONG_VALUE,
            f"pageSize must be 1 to {MAX_PAGE_SIZE[show_detail]} when showDetail is {show_detail}.",
        )
    if ints["pageNum"] == 0:
        raise ParameterError(WRONG_VALUE, "pageNum must be a positive integer.")
    session_id = strs["sessionId"]
    if session_id is not None and len(session_id) > MAX_SESSION_ID:
        raise ParameterError(TOO_LONG, f"sessionId must be at most {MAX_SESSION_ID} characters.")

    begin_text, end_text = strs["beginTime"], strs["endTime"]
    begin = end = None
    if (begin_text is None) != (end_text is None):
        raise ParameterError(TIME_PAIR, "beginTime and endTime must be given together.")
    if begin_text is not None and end_text is not None:
        begin = _date_field("beginTime", begin_text)
        end = _date_field("endTime", end_text)
        if begin >= end:
            raise ParameterError(TIME_ORDER, "beginTime must be earlier than endTime.")
        if (end - begin).days > MAX_SPAN_DAYS:
            raise ParameterError(TIME_SPAN, "beginTime and endTime are more than 30 days apart.")

    return CallResultQuery(
        vdn_id=vdn_id,
        campaign_id=campaign_id,
        session_id=session_id,
        custom_field=strs["customField"],
        page_size=page_size,
        page_num=ints["pageNum"],
        show_detail=show_detail,
        begin_time=begin,
        end_time=end,
    )


def parse_request(vdn_text: str, campaign_text: str, raw: bytes) -> CallResultQuery:
    """Path parameters and raw body to a valid query, or ``ParameterError``."""
    vdn_id = parse_path_id("vdnId", vdn_text, 1, 9999)
    campaign_id = parse_path_id("campaignId", campaign_text, 1, MAX_INT)
    return validate_query(vdn_id, campaign_id, parse_body(raw))
