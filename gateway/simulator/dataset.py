"""Deterministic synthetic call results, and the query semantics over them.

Pure: no I/O, no clock, never the global ``random``. Every (seed, vdnId, campaignId) has its
own ``random.Random``, so a campaign's data does not depend on which campaigns were asked
for before it, nor on the process. Campaigns are generated on first use and a bounded number
are memoized, which keeps load tests with hundreds of distinct queries cheap.

The vendor leaves some paging cases undocumented; the simulator assumes:

- ``pageSize`` and ``pageNum`` both absent: the first ``UNPAGED_CAP`` (2000) rows (documented);
- only ``pageNum``: pages of ``DEFAULT_PAGE_SIZE`` (100) rows (an assumption);
- only ``pageSize``: page 1;
- a page past the end: no rows, the true ``totalCount``.

Filters apply before paging: ``sessionId`` and ``customField`` exact, and ``beginTime`` /
``endTime`` as inclusive dates on each row's ``callTimeStr``. With ``showDetail`` 0 a
subscriber gives one row, its final (last) attempt; with 1, one row per attempt.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Final

from gateway.validation import CallResultQuery

UNPAGED_CAP: Final = 2000
DEFAULT_PAGE_SIZE: Final = 100
BIG_CAMPAIGN_EVERY: Final = 10  # every 10th campaign has > UNPAGED_CAP subscribers
HISTORY_DAYS: Final = 60
SUCCESS_SHARE: Final = 0.6
CUSTOM_FIELDS: Final = ("batch-A", "batch-B", "batch-C", "batch-D")
# failCode -> the external resultCode the campaign maps it to
FAILURES: Final = {"10002": "OB00001", "10003": "OB00002", "10007": "OB00003"}
SUCCESS_RESULT: Final = "OB99999"

Row = Mapping[str, str | int]


@dataclass(frozen=True, slots=True)
class Subscriber:
    """One dialled number; ``attempts`` are its result rows, oldest first (never empty)."""

    session_id: str
    custom_field: str
    attempts: tuple[Row, ...]


def campaign_size(rng: random.Random, campaign_id: int) -> int:
    """Subscribers in a campaign: 20..600, or 2001..3000 for every 10th campaign."""
    if campaign_id % BIG_CAMPAIGN_EVERY == 0:
        return rng.randint(UNPAGED_CAP + 1, 3000)
    return rng.randint(20, 600)


def generate_campaign(
    seed: int, vdn_id: int, campaign_id: int, today: date
) -> tuple[Subscriber, ...]:
    """The campaign's subscribers; the same arguments always give equal data.

    Every call lies in the ``HISTORY_DAYS`` days before ``today`` (``today`` itself excluded).
    Attempts before the last failed; the last succeeded with probability ``SUCCESS_SHARE``.
    """
    # A str seed is hashed with SHA-512 by random.Random: stable across runs and processes.
    rng = random.Random(f"{seed}:{vdn_id}:{campaign_id}")  # noqa: S311 -- data, not secrets
    start = datetime.combine(today, time()) - timedelta(days=HISTORY_DAYS)
    span_s = HISTORY_DAYS * 86400
    fail_codes = sorted(FAILURES)
    subscribers: list[Subscriber] = []
    seq = 0
    for n in range(1, campaign_size(rng, campaign_id) + 1):
        session_id = f"{campaign_id}_{n:06d}"
        custom_field = rng.choice(CUSTOM_FIELDS)
        called = f"1{rng.randrange(10**10):010d}"
        offsets = sorted(rng.randrange(span_s) for _ in range(rng.randint(1, 3)))
        succeeded = rng.random() < SUCCESS_SHARE
        attempts: list[Row] = []
        for i, offset in enumerate(offsets):
            seq += 1
            moment = start + timedelta(seconds=offset)
            ok = succeeded and i == len(offsets) - 1
            fail_code = "0" if ok else rng.choice(fail_codes)
            record_path = (
                f"Y:/1/{vdn_id}/{moment:%Y%m%d}/{rng.randrange(1000, 10000)}/"
                f"{rng.randrange(10**7):07d}.V3"
                if ok
                else ""
            )
            # Key order is the vendor document's Table 5: the response bytes depend on it.
            attempts.append(
                {
                    "campaignId": str(campaign_id),
                    "sessionId": session_id,
                    "called": called,
                    "callTimeStr": f"{moment:%Y-%m-%d %H:%M:%S}",
                    "callStatus": 6 if ok else 5,
                    "failCode": fail_code,
                    "resultCode": SUCCESS_RESULT if ok else FAILURES[fail_code],
                    "vdnId": vdn_id,
                    # Fixed-width sequence after the campaign id: unique within a VDN.
                    "callId": f"{vdn_id:04d}-{campaign_id}{seq:06d}",
                    "recordPath": record_path,
                }
            )
        subscribers.append(Subscriber(session_id, custom_field, tuple(attempts)))
    return tuple(subscribers)


def matching_rows(subscribers: Sequence[Subscriber], query: CallResultQuery) -> list[Row]:
    """Every row the query's filters and ``showDetail`` select, in data order."""
    begin = query.begin_time.isoformat() if query.begin_time else None
    end = query.end_time.isoformat() if query.end_time else None
    rows: list[Row] = []
    for sub in subscribers:
        if query.session_id is not None and sub.session_id != query.session_id:
            continue
        if query.custom_field is not None and sub.custom_field != query.custom_field:
            continue
        candidates = sub.attempts if query.show_detail == 1 else sub.attempts[-1:]
        for row in candidates:
            # ISO dates compare correctly as text; callTimeStr starts with one.
            day = str(row["callTimeStr"])[:10]
            if begin is not None and end is not None and not begin <= day <= end:
                continue
            rows.append(row)
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
        self._seed = seed
        self._today = today
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[int, int], tuple[Subscriber, ...]] = OrderedDict()

    def campaign(self, vdn_id: int, campaign_id: int) -> tuple[Subscriber, ...]:
        key = (vdn_id, campaign_id)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        data = generate_campaign(self._seed, vdn_id, campaign_id, self._today)
        self._cache[key] = data
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return data

    def query(self, query: CallResultQuery) -> tuple[int, list[Row]]:
        """``(totalCount, rows of the requested page)``; the campaign must exist."""
        rows = matching_rows(self.campaign(query.vdn_id, query.campaign_id), query)
        return len(rows), page(rows, query.page_size, query.page_num)
