"""Synthetic call results that behave like a live iSales server, not a tidy table.

Pure: no I/O and no clock (the caller passes the simulated moment), never the global
``random``. Every (seed, vdnId, campaignId) has its own ``random.Random``, so a campaign's data
does not depend on what was asked before, nor on the process; the ``max_cached`` most recently
used campaigns are memoized.

- **Records and final rows.** A campaign is loaded with subscribers (``sessionId``); most
  have one record, some two (loaded again, e.g. in another batch: ``customField`` is the
  batch). Each record is dialled one to three times. ``showDetail`` 1 gives every call;
  ``showDetail`` 0 each record's latest completed call, so one ``sessionId`` can have several
  final rows (the document's sample has two).
- **Time order.** Rows come ordered by ``callTimeStr``, then ``callId``, whatever the filter.
- **Growth.** Calls lie in the ``HISTORY_DAYS`` days before ``today``. In a running campaign
  (every ``RUNNING_EVERY``-th) a share of the records is dialled in the first
  ``RUNNING_HOURS`` hours of ``today`` instead, and "only the results of complete outbound
  calls can be queried": a call shows once the simulated moment has reached it. So a running
  campaign's open-ended results grow while the simulator runs; a range that ended before
  ``today`` never changes.
- **Codes.** ``callStatus`` 6 success, 5 failure; ``failCode`` ``"0"`` on success (as in the
  document's sample), else a five-digit code of the vendor's published table (``00531``,
  ``00537``, ``01040``, ``34601``); ``resultCode`` the external code the campaign maps it to.
- **The document's sample.** With ``DOCUMENT_SEED``, campaign 3 of VDN 11 also holds the
  document's sample subscriber ``1202_test013`` with its two rows, word for word.

Paging the vendor leaves undocumented, as assumed here: ``pageSize`` and ``pageNum`` both
absent, the first ``UNPAGED_CAP`` (2000) rows (documented); only ``pageNum``, pages of
``DEFAULT_PAGE_SIZE`` (100); only ``pageSize``, page 1; a page past the end, no rows and the
true ``totalCount``. Filters apply before paging: ``sessionId`` and ``customField`` exact,
``beginTime``/``endTime`` inclusive dates of ``callTimeStr``.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Final

from gateway.simulator.rules import Query

UNPAGED_CAP: Final = 2000
DEFAULT_PAGE_SIZE: Final = 100
BIG_CAMPAIGN_EVERY: Final = 10  # every 10th campaign has more than UNPAGED_CAP subscribers
RUNNING_EVERY: Final = 4  # every 4th campaign is still dialling
RUNNING_HOURS: Final = 4
RUNNING_SHARE: Final = 0.3  # of a running campaign's records, dialled during RUNNING_HOURS
HISTORY_DAYS: Final = 60
SUCCESS_SHARE: Final = 0.6
RELOADED_SHARE: Final = 0.15  # subscribers loaded twice: two records, two final rows
CUSTOM_FIELDS: Final = ("batch-A", "batch-B", "batch-C", "batch-D")
# The vendor's published failure codes -> the external resultCode the campaign maps them to.
FAILURES: Final = {"00531": "OB00001", "00537": "OB00002", "01040": "OB00003", "34601": "OB00004"}
SUCCESS_FAIL_CODE: Final = "0"
SUCCESS_RESULT: Final = "OB99999"
DOCUMENT_SEED: Final = 20200830
TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"

Row = Mapping[str, str | int]


def _sample_row(at: str, call_id: str, record_path: str) -> Row:
    return {
        "campaignId": "3",
        "sessionId": "1202_test013",
        "called": "60584",
        "callTimeStr": at,
        "callStatus": 6,
        "failCode": "0",
        "resultCode": "OB99999",
        "vdnId": 11,
        "callId": call_id,
        "recordPath": record_path,
    }


# The document's sample answer: one subscriber, two final rows five minutes apart.
DOCUMENT_SAMPLE: Final = (
    _sample_row("2020-08-30 20:00:00", "0023-134864174", "Y:/1/11/20200830/3408/0949218.V3"),
    _sample_row("2020-08-30 20:05:00", "0023-134864893", "Y:/1/11/20200830/3408/0942113.V3"),
)


@dataclass(frozen=True, slots=True)
class Call:
    """One completed-or-future call: its row and what it belongs to."""

    at: str  # callTimeStr: sorts as time
    record: int  # the record it dials, unique in the campaign
    custom_field: str
    row: Row


@dataclass(slots=True)
class Campaign:
    """Every call of a campaign, in time order; ``times`` is their ``callTimeStr``."""

    calls: tuple[Call, ...]
    times: list[str] = field(init=False, compare=False)
    _finals: tuple[int, list[Call]] | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        self.times = [call.at for call in self.calls]

    def completed(self, moment: str) -> int:
        """How many calls have completed at ``moment`` (a ``callTimeStr``)."""
        return bisect.bisect_right(self.times, moment)

    def finals(self, done: int) -> list[Call]:
        """Each record's latest call among the first ``done``, in time order."""
        if self._finals is not None and self._finals[0] == done:
            return self._finals[1]
        last: dict[int, int] = {}
        for i in range(done):
            last[self.calls[i].record] = i
        finals = [self.calls[i] for i in sorted(last.values())]
        self._finals = (done, finals)
        return finals


def campaign_size(rng: random.Random, campaign_id: int) -> int:
    """Subscribers in a campaign: 20..600, or 2001..3000 for every 10th campaign."""
    if campaign_id % BIG_CAMPAIGN_EVERY == 0:
        return rng.randint(UNPAGED_CAP + 1, 3000)
    return rng.randint(20, 600)


def generate_campaign(seed: int, vdn_id: int, campaign_id: int, today: date) -> Campaign:
    """The campaign's calls; the same arguments always give equal data."""
    # A str seed is hashed with SHA-512 by random.Random: stable across runs and processes.
    rng = random.Random(f"{seed}:{vdn_id}:{campaign_id}")  # noqa: S311 -- data, not secrets
    midnight = datetime.combine(today, time())
    history_start = midnight - timedelta(days=HISTORY_DAYS)
    running = campaign_id % RUNNING_EVERY == 0
    fail_codes = sorted(FAILURES)
    pending: list[tuple[str, int, str, dict[str, str | int]]] = []
    record = 0
    for n in range(1, campaign_size(rng, campaign_id) + 1):
        session_id = f"{campaign_id}_{n:06d}"
        called = f"1{rng.randrange(10**10):010d}"
        for _ in range(2 if rng.random() < RELOADED_SHARE else 1):
            record += 1
            batch = rng.choice(CUSTOM_FIELDS)
            if running and rng.random() < RUNNING_SHARE:
                start, span_s = midnight, RUNNING_HOURS * 3600
            else:
                start, span_s = history_start, HISTORY_DAYS * 86400
            offsets = sorted(rng.randrange(span_s) for _ in range(rng.randint(1, 3)))
            succeeded = rng.random() < SUCCESS_SHARE
            for i, offset in enumerate(offsets):
                moment = start + timedelta(seconds=offset)
                at = moment.strftime(TIME_FORMAT)
                ok = succeeded and i == len(offsets) - 1
                fail_code = SUCCESS_FAIL_CODE if ok else rng.choice(fail_codes)
                record_path = (
                    f"Y:/1/{vdn_id}/{moment:%Y%m%d}/{rng.randrange(1000, 10000)}/"
                    f"{rng.randrange(10**7):07d}.V3"
                    if ok
                    else ""
                )
                # Key order is the document's Table 5: the response bytes depend on it.
                row: dict[str, str | int] = {
                    "campaignId": str(campaign_id),
                    "sessionId": session_id,
                    "called": called,
                    "callTimeStr": at,
                    "callStatus": 6 if ok else 5,
                    "failCode": fail_code,
                    "resultCode": SUCCESS_RESULT if ok else FAILURES[fail_code],
                    "vdnId": vdn_id,
                    "callId": "",  # numbered below, in time order
                    "recordPath": record_path,
                }
                pending.append((at, record, batch, row))
    pending.sort(key=lambda item: (item[0], item[1]))
    calls: list[Call] = []
    for seq, (at, rec, batch, row) in enumerate(pending, start=1):
        # Fixed-width sequence after the campaign id: unique within a VDN, rising with time.
        row["callId"] = f"{vdn_id:04d}-{campaign_id}{seq:06d}"
        calls.append(Call(at, rec, batch, row))
    if seed == DOCUMENT_SEED and (vdn_id, campaign_id) == (11, 3):
        sample = [
            Call(str(r["callTimeStr"]), -1 - i, "batch-A", r) for i, r in enumerate(DOCUMENT_SAMPLE)
        ]
        calls = sorted(calls + sample, key=lambda c: (c.at, str(c.row["callId"])))
    return Campaign(tuple(calls))


def select(campaign: Campaign, query: Query, moment: str) -> list[Row]:
    """Every row ``query`` selects among the calls completed at ``moment``, in time order."""
    done = campaign.completed(moment)
    calls: Sequence[Call] = (
        campaign.calls[:done] if query.show_detail == 1 else campaign.finals(done)
    )
    begin = query.begin.isoformat() if query.begin else None
    end = query.end.isoformat() if query.end else None
    rows: list[Row] = []
    for call in calls:
        if query.session_id is not None and call.row["sessionId"] != query.session_id:
            continue
        if query.custom_field is not None and call.custom_field != query.custom_field:
            continue
        # ISO dates compare correctly as text; callTimeStr starts with one.
        if begin is not None and end is not None and not begin <= call.at[:10] <= end:
            continue
        rows.append(call.row)
    return rows


def page(rows: Sequence[Row], page_size: int | None, page_num: int | None) -> list[Row]:
    """The requested 1-based page (see the module docstring for absent fields)."""
    if page_size is None and page_num is None:
        return list(rows[:UNPAGED_CAP])
    size = DEFAULT_PAGE_SIZE if page_size is None else page_size
    first = ((page_num or 1) - 1) * size
    return list(rows[first : first + size])


class DataSet:
    """Campaign data for one simulator, memoizing the ``max_cached`` most recently used."""

    def __init__(self, seed: int, today: date, max_cached: int = 64) -> None:
        self.seed = seed
        self.today = today
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[int, int], Campaign] = OrderedDict()

    def moment(self, elapsed_s: float) -> str:
        """The simulated ``callTimeStr`` ``elapsed_s`` seconds after ``today`` began."""
        return (datetime.combine(self.today, time()) + timedelta(seconds=elapsed_s)).strftime(
            TIME_FORMAT
        )

    def campaign(self, vdn_id: int, campaign_id: int) -> Campaign:
        key = (vdn_id, campaign_id)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        data = generate_campaign(self.seed, vdn_id, campaign_id, self.today)
        self._cache[key] = data
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return data

    def query(self, query: Query, moment: str) -> tuple[int, list[Row]]:
        """``(totalCount, rows of the requested page)`` at ``moment``; the campaign must exist."""
        rows = select(self.campaign(query.vdn_id, query.campaign_id), query, moment)
        return len(rows), page(rows, query.page_size, query.page_num)
