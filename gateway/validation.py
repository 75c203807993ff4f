"""Validate and canonicalize a callresult query: the vendor's documented rules, and the rest.

Pure: no I/O, no clock. The rules that the vendor's document
(``shared/upstream/callresult-api.txt``) states are answered here, with the vendor's codes
(``ParameterError``), and cost no upstream slot. Where the document is silent the vendor
judges: a request that breaks only an undocumented rule is valid here, marked ``silent`` with
the code a strict reading would give, and keeps the caller's body (``verbatim``) so that it
goes upstream unchanged. ``refuse_undocumented`` turns the mark into that error
(``validation.undocumented = "reject"``).

Documented, answered here:

- vdnId an integer 1..9999 (02000006 not digits, 02000007 out of range); campaignId an
  integer (02000006 not digits, 02000007 beyond a Java int);
- the body UTF-8 JSON (02000008), an object (02000006); ``NaN``, ``Infinity`` and numbers
  beyond a double are not JSON numbers (02000006);
- pageSize, pageNum, showDetail integers: a boolean, object, array or a string that is not
  an integer is a wrong type (02000006); beyond a Java int a wrong value (02000007);
- pageSize at most 500, at most 100 with showDetail 1; showDetail 0 or 1 (02000007);
- sessionId, customField, beginTime, endTime strings (an object or array 02000006; for the
  two dates anything but a string); sessionId at most 32 characters, counted in UTF-16 units
  as Java counts them (02000003);
- beginTime and endTime both or neither (0200008), ``YYYY-MM-DD`` (0200009), begin earlier
  than end (0200010), at most 30 days apart (0200011).

Silent, forwarded (or refused with this code):

- an unknown field (0200001);
- an integer field as a string of digits (``"10"``) or a number with a fraction or exponent
  (``10.0``, ``1e2``), a number or boolean for sessionId/customField (02000006);
- an empty string in a string field (02000001);
- pageSize or pageNum below 1, campaignId 0 (02000007).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from datetime import date
from typing import Any, Final

from gateway.errors import ParameterError
from gateway.vendor import (
    CONVERSION,
    EMPTY,
    MAX_INT,
    MAX_PAGE_SIZE,
    MAX_SESSION_ID,
    MAX_SPAN_DAYS,
    MAX_VDN_ID,
    MIN_VDN_ID,
    PARAMETER_ERROR,
    TIME_FORMAT,
    TIME_ORDER,
    TIME_PAIR,
    TIME_SPAN,
    TOO_LONG,
    WRONG_TYPE,
    WRONG_VALUE,
    callresult_path,
)

_DIGITS = re.compile(r"[0-9]+")
_INT_TEXT = re.compile(r"-?[0-9]+")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_INT_FIELDS = ("pageSize", "pageNum", "showDetail")
_STR_FIELDS = ("sessionId", "customField", "beginTime", "endTime")
_LENIENT_STR_FIELDS = frozenset({"sessionId", "customField"})  # free text: a number reads as one
KNOWN_FIELDS: Final = frozenset(_INT_FIELDS + _STR_FIELDS)

Silent = tuple[str, str]  # (vendor code, message) of an undocumented rule


@dataclass(frozen=True, slots=True)
class CallResultQuery:
    """A query the gateway may send; ``show_detail`` has its default filled, other absent
    fields are None. ``silent``: the first undocumented rule it breaks, if any; then
    ``verbatim`` holds the caller's body (UTF-8), which is what goes upstream.
    """

    vdn_id: int
    campaign_id: int
    session_id: str | None = None
    custom_field: str | None = None
    page_size: int | None = None
    page_num: int | None = None
    show_detail: int = 0
    begin_time: date | None = None
    end_time: date | None = None
    verbatim: bytes | None = None
    silent: Silent | None = None

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
        """What is signed and sent upstream: the caller's body unchanged when it breaks an
        undocumented rule, else the canonical body (compact, fixed key order)."""
        if self.verbatim is not None:
            return self.verbatim
        return json.dumps(self.body(), ensure_ascii=False, separators=(",", ":")).encode()

    @property
    def path(self) -> str:
        return callresult_path(self.vdn_id, self.campaign_id)


def refuse_undocumented(query: CallResultQuery) -> None:
    """``validation.undocumented = "reject"``: the undocumented rule ``query`` breaks, raised."""
    if query.silent is not None:
        raise ParameterError(*query.silent)


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


class _NotFinite(ValueError):
    """NaN, Infinity or a number beyond a double: not a JSON number."""


def _no_constant(name: str) -> float:
    raise _NotFinite(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def decode_text(raw: bytes, charset: str | None) -> str:
    """The body as text, in the ``Content-Type`` charset (UTF-8 when none is given)."""
    try:
        return raw.decode(charset or "utf-8")
    except LookupError as exc:  # an unknown charset, or not a text encoding (e.g. base64)
        raise ParameterError(CONVERSION, f"Unsupported charset: {charset!s:.40}.") from exc
    except UnicodeError as exc:
        name = "UTF-8" if charset is None else f"{charset:.40}"
        raise ParameterError(CONVERSION, f"Request body is not valid {name} text.") from exc


def parse_body(raw: bytes, charset: str | None = None) -> tuple[dict[str, Any], str]:
    """The request body as a JSON object, and its text; an empty body is an empty query."""
    if not raw.strip():
        return {}, ""
    text = decode_text(raw, charset)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        if "\\u" in text:
            # A lone surrogate escape ("\ud800") parses but has no UTF-8 form: it would fail
            # later, when the query is encoded for the upstream or quoted in an error.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except _NotFinite as exc:
        raise ParameterError(WRONG_TYPE, "A number in the body is not finite.") from exc
    except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise ParameterError(CONVERSION, "Request body is not valid JSON.") from exc
    if not isinstance(value, dict):
        raise ParameterError(WRONG_TYPE, "Request body must be a JSON object.")
    return value, text


def _int_field(body: dict[str, Any], name: str, silent: list[Silent]) -> int | None:
    """An integer field; None if absent or in a shape only the vendor can judge."""
    value = body.get(name)
    if value is None:
        return None
    wrong = ParameterError(WRONG_TYPE, f"{name} must be an integer.")
    if isinstance(value, bool | dict | list):
        raise wrong
    if isinstance(value, float) or (isinstance(value, str) and _INT_TEXT.fullmatch(value)):
        silent.append((wrong.vendor_code, wrong.message))
        return None
    if isinstance(value, str):
        raise wrong
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise ParameterError(WRONG_VALUE, f"{name} is out of range.")
    return int(value)


def _str_field(body: dict[str, Any], name: str, silent: list[Silent]) -> str | None:
    """A string field; None if absent or in a shape only the vendor can judge."""
    value = body.get(name)
    if value is None:
        return None
    wrong = ParameterError(WRONG_TYPE, f"{name} must be a string.")
    if isinstance(value, dict | list):
        raise wrong
    if not isinstance(value, str):
        if name not in _LENIENT_STR_FIELDS:
            raise wrong
        silent.append((wrong.vendor_code, wrong.message))
        return None
    if value == "":
        silent.append((EMPTY, f"{name} must not be empty."))
        return None
    return value


def _date_field(name: str, text: str) -> date:
    if not _DATE.fullmatch(text):
        raise ParameterError(TIME_FORMAT, f"{name} must be YYYY-MM-DD.")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ParameterError(TIME_FORMAT, f"{name} is not a valid date.") from exc


def utf16_length(text: str) -> int:
    """``text.length()`` in Java: UTF-16 code units (a character beyond U+FFFF counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def validate_query(
    vdn_id: int,
    campaign_id: int,
    body: dict[str, Any],
    silent: list[Silent] | None = None,
) -> CallResultQuery:
    """Apply every documented rule (``ParameterError``); note undocumented ones in ``silent``.

    The query returned carries the first silent rule, but not the caller's body: that is
    ``parse_request``'s to add.
    """
    silent = [] if silent is None else silent
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        silent.append((PARAMETER_ERROR, f"Unknown parameter: {unknown[0][:64]}."))
    ints = {name: _int_field(body, name, silent) for name in _INT_FIELDS}
    strs = {name: _str_field(body, name, silent) for name in _STR_FIELDS}

    show_detail = ints["showDetail"]
    if show_detail is not None and show_detail not in MAX_PAGE_SIZE:
        raise ParameterError(WRONG_VALUE, "showDetail must be 0 or 1.")
    # An undocumented showDetail ("1") leaves only the looser documented bound.
    bound = MAX_PAGE_SIZE[1 if show_detail == 1 else 0]
    page_size = ints["pageSize"]
    if page_size is not None and page_size > bound:
        shown = 0 if show_detail is None else show_detail
        raise ParameterError(
            WRONG_VALUE, f"pageSize must be 1 to {bound} when showDetail is {shown}."
        )
    if page_size is not None and page_size < 1:
        silent.append((WRONG_VALUE, f"pageSize must be 1 to {bound}."))
    if ints["pageNum"] is not None and ints["pageNum"] < 1:
        silent.append((WRONG_VALUE, "pageNum must be a positive integer."))
    session_id = strs["sessionId"]
    if session_id is not None and utf16_length(session_id) > MAX_SESSION_ID:
        raise ParameterError(TOO_LONG, f"sessionId must be at most {MAX_SESSION_ID} characters.")

    given_begin, given_end = body.get("beginTime"), body.get("endTime")
    # An empty date is the vendor's to read (as absent, or as a bad date): no pair rule then.
    if (given_begin is None) != (given_end is None) and "" not in (given_begin, given_end):
        raise ParameterError(TIME_PAIR, "beginTime and endTime must be given together.")
    begin_text, end_text = strs["beginTime"], strs["endTime"]
    begin = None if begin_text is None else _date_field("beginTime", begin_text)
    end = None if end_text is None else _date_field("endTime", end_text)
    if begin is not None and end is not None:
        if begin >= end:
            raise ParameterError(TIME_ORDER, "beginTime must be earlier than endTime.")
        if (end - begin).days > MAX_SPAN_DAYS:
            raise ParameterError(
                TIME_SPAN, f"beginTime and endTime are more than {MAX_SPAN_DAYS} days apart."
            )

    return CallResultQuery(
        vdn_id=vdn_id,
        campaign_id=campaign_id,
        session_id=session_id,
        custom_field=strs["customField"],
        page_size=page_size,
        page_num=ints["pageNum"],
        show_detail=0 if show_detail is None else show_detail,
        begin_time=begin,
        end_time=end,
        silent=silent[0] if silent else None,
    )


def parse_request(
    vdn_text: str, campaign_text: str, raw: bytes, *, charset: str | None = None
) -> CallResultQuery:
    """Path parameters and raw body to a query, or ``ParameterError`` (a documented rule).

    ``charset``: the request's ``Content-Type`` charset (None: UTF-8, the vendor's).
    """
    vdn_id = parse_path_id("vdnId", vdn_text, MIN_VDN_ID, MAX_VDN_ID)
    campaign_id = parse_path_id("campaignId", campaign_text, 0, MAX_INT)
    silent: list[Silent] = []
    if campaign_id == 0:
        silent.append((WRONG_VALUE, f"campaignId must be between 1 and {MAX_INT}."))
    body, text = parse_body(raw, charset)
    query = validate_query(vdn_id, campaign_id, body, silent)
    if query.silent is None:
        return query
    # Sent as the caller wrote it; re-encoded only if it came in another charset.
    verbatim = raw if charset is None else text.encode("utf-8")
    return replace(query, verbatim=verbatim)
