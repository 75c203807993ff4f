"""Refresh-ahead: which cache hits should trigger a background refresh of their entry.

Pure (the time is passed in). Popularity is counted per entry life (hits since it was stored)
in this process only: each replica decides from the hits it served, so a key hit evenly
across three replicas needs ``min_hits`` hits on one of them. A refresh is asked for once
per entry life, when a hit lands within ``lead_s`` of the end of an open-ended entry's TTL.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.cache_policy import CacheEntry


@dataclass(frozen=True, slots=True)
class RefreshRule:
    """``min_hits`` hits in an entry's life make it popular; ``lead_s`` before its TTL ends a
    hit asks for a refresh; only entries living at most ``max_ttl`` (open-ended) qualify."""

    min_hits: int = 3
    lead_s: float = 5.0
    max_ttl: float = 30.0


class Popularity:
    """Hits per cached entry, bounded to ``max_keys`` (the least recently added forgotten)."""

    def __init__(self, rule: RefreshRule, max_keys: int = 10000) -> None:
        self.rule = rule
        self._max_keys = max_keys
        # key -> [stored_at of the entry life counted, hits, refresh asked]
        self._hits: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._hits)

    def hit(self, key: str, entry: CacheEntry, now: float) -> bool:
        """Count a hit on ``entry`` at ``now`` (epoch seconds); True when this hit should
        start a refresh-ahead of it (at most once per entry life)."""
        record = self._hits.get(key)
        if record is None or record[0] != entry.stored_at:
            record = [entry.stored_at, 0.0, 0.0]
            self._hits.pop(key, None)
            self._hits[key] = record
            if len(self._hits) > self._max_keys:
                del self._hits[next(iter(self._hits))]
        record[1] += 1
        rule = self.rule
        due = (
            not record[2]
            and rule.lead_s > 0
            and entry.ttl <= rule.max_ttl
            and record[1] >= rule.min_hits
            and now >= entry.stored_at + entry.ttl - rule.lead_s
        )
        if due:
            record[2] = 1.0
        return due

    def failed(self, key: str, entry: CacheEntry) -> None:
        """The refresh did not happen (no idle permit): a later hit may ask again."""
        record = self._hits.get(key)
        if record is not None and record[0] == entry.stored_at:
            record[2] = 0.0
