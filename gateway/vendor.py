"""What the vendor defines: the callresult route, its result codes, ranges and header names.

Written once, from ``shared/upstream/callresult-api.txt`` and ``facts.md``; every gateway
module reads them from here. The simulator does not (it is written from the document on its
own, so that the two can disagree and a test can notice).
"""

from __future__ import annotations

from typing import Final

# The route, with aiohttp's placeholders; ``callresult_path`` fills them.
CALLRESULT_ROUTE: Final = "/rest/isales/v1/openapi/campaigns/{vdnId}/callresult/{campaignId}"


def callresult_path(vdn_id: int, campaign_id: int) -> str:
    """The upstream path of one campaign's query."""
    return CALLRESULT_ROUTE.format(vdnId=vdn_id, campaignId=campaign_id)


# Result codes (Table 6), answered in ``resultCode``/``returnCode`` with HTTP 200.
SUCCESS: Final = "0200000"
PARAMETER_ERROR: Final = "0200001"
CAMPAIGN_NOT_FOUND: Final = "0200007"
TIME_PAIR: Final = "0200008"
TIME_FORMAT: Final = "0200009"
TIME_ORDER: Final = "0200010"
TIME_SPAN: Final = "0200011"
EMPTY: Final = "02000001"
INVALID_CHARACTERS: Final = "02000002"
TOO_LONG: Final = "02000003"
TOO_SHORT: Final = "02000004"
LENGTH_RANGE: Final = "02000005"
WRONG_TYPE: Final = "02000006"
WRONG_VALUE: Final = "02000007"
CONVERSION: Final = "02000008"
COMBINATION: Final = "02000009"
HOUR_MINUTE_PAIR: Final = "02000010"
TOO_MANY: Final = "02000011"
# Every documented code, success first, in the document's order.
RESULT_CODES: Final = (
    SUCCESS,
    PARAMETER_ERROR,
    CAMPAIGN_NOT_FOUND,
    TIME_PAIR,
    TIME_FORMAT,
    TIME_ORDER,
    TIME_SPAN,
    EMPTY,
    INVALID_CHARACTERS,
    TOO_LONG,
    TOO_SHORT,
    LENGTH_RANGE,
    WRONG_TYPE,
    WRONG_VALUE,
    CONVERSION,
    COMBINATION,
    HOUR_MINUTE_PAIR,
    TOO_MANY,
)

# Ranges. vdnId is documented 1-9999; campaignId and the integer body fields are Java ints.
MIN_VDN_ID: Final = 1
MAX_VDN_ID: Final = 9999
MAX_INT: Final = 2**31 - 1  # java.lang.Integer.MAX_VALUE
MAX_SESSION_ID: Final = 32  # characters, counted in UTF-16 units as Java counts them
MAX_PAGE_SIZE: Final = {0: 500, 1: 100}  # by showDetail
MAX_SPAN_DAYS: Final = 30  # between beginTime and endTime

# Headers. The request's Content-Type is fixed by the document; the gateway's own answers
# carry the vendor's answers' Content-Type byte for byte (a client matching it sees the same).
# ``locale`` is optional: the vendor's default is zh_CN.
REQUEST_CONTENT_TYPE: Final = "application/json; charset=UTF-8"
RESPONSE_CONTENT_TYPE: Final = "application/json;charset=UTF-8"
LOCALE_HEADER: Final = "locale"
DEFAULT_LOCALE: Final = "zh_CN"
LOCALES: Final = frozenset({"zh_CN", "en_US"})
