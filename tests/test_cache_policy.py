"""The cache decision without I/O: what a lookup means, which ``X-Cache`` label, stale-if-error."""

from __future__ import annotations

import pytest

from gateway.cache_policy import (
    BYPASS,
    COALESCED,
    HIT,
    MISS,
    CacheEntry,
    CachePolicy,
    Fetch,
    FromCache,
    Revalidate,
    fetched_label,
    on_lookup,
    reusable,
    stale_reason,
    stale_warning,
)

POLICY = CachePolicy(ttl_closed=86400, ttl_open=30, stale=60, swr=10)


def stored(at: float = 100.0, *, ttl: float = 30, stale: float = 60) -> CacheEntry:
    return CacheEntry(b'{"resultCode":"0200000"}', "application/json", at, ttl, stale)


def test_nothing_found_is_a_fetch_with_no_stale_fallback() -> None:
    decision = on_lookup(None, 100.0, POLICY)
    assert decision == Fetch(None)
    assert decision.lookup == "miss"


def test_a_fresh_entry_is_answered_from_the_cache_with_its_whole_seconds_of_age() -> None:
    entry = stored()
    assert on_lookup(entry, 100.0, POLICY) == FromCache(entry, 0)
    assert on_lookup(entry, 107.9, POLICY) == FromCache(entry, 7)
    assert on_lookup(entry, 129.9, POLICY) == FromCache(entry, 29)
    assert FromCache(entry, 0).lookup == "hit"


def test_an_entry_from_a_clock_ahead_of_ours_has_age_zero_not_negative() -> None:
    entry = stored(at=105.0)
    assert on_lookup(entry, 100.0, POLICY) == FromCache(entry, 0)


def test_within_swr_after_its_ttl_the_stale_copy_is_served_and_revalidated() -> None:
    entry = stored()
    assert on_lookup(entry, 130.0, POLICY) == Revalidate(entry, 30)
    assert on_lookup(entry, 139.9, POLICY) == Revalidate(entry, 39)
    assert Revalidate(entry, 30).lookup == "stale"


def test_past_swr_a_stale_copy_is_kept_only_as_the_fallback_of_a_fetch() -> None:
    entry = stored()
    decision = on_lookup(entry, 140.0, POLICY)
    assert decision == Fetch(entry)
    assert decision.lookup == "stale"
    assert on_lookup(entry, 189.9, POLICY) == Fetch(entry)


def test_without_swr_a_stale_copy_is_never_served_before_trying_the_upstream() -> None:
    entry = stored()
    assert on_lookup(entry, 130.0, CachePolicy(swr=0)) == Fetch(entry)


def test_past_its_stale_retention_an_entry_is_as_good_as_absent() -> None:
    decision = on_lookup(stored(), 190.0, POLICY)
    assert decision == Fetch(None)
    assert decision.lookup == "miss"


def test_a_swr_longer_than_the_stale_retention_never_revives_an_expired_entry() -> None:
    entry = stored(stale=5)
    assert on_lookup(entry, 134.0, CachePolicy(swr=60)) == Revalidate(entry, 34)
    assert on_lookup(entry, 135.0, CachePolicy(swr=60)) == Fetch(None)


@pytest.mark.parametrize(
    ("led", "cached", "cache_on", "refresh", "label"),
    [
        (False, False, True, False, COALESCED),  # another request's call answered
        (False, False, False, True, COALESCED),  # even a no-cache follower shares the call
        (True, True, True, False, HIT),  # the double check found a fresh answer
        (True, True, True, True, HIT),  # no-cache within no_cache_min_age of the last answer
        (True, False, True, False, MISS),
        (True, False, False, False, BYPASS),  # no cache configured
        (True, False, True, True, BYPASS),  # the caller's no-cache
    ],
)
def test_the_label_of_a_fetched_answer_says_who_paid_for_it(
    led: bool, cached: bool, cache_on: bool, refresh: bool, label: str
) -> None:
    assert fetched_label(led=led, cached=cached, cache_on=cache_on, refresh=refresh) == label


def test_a_stale_copy_instead_of_an_error_says_why_in_its_label_and_warning() -> None:
    assert stale_reason(overloaded=True) == "overload"
    assert stale_reason(overloaded=False) == "upstream_error"
    assert stale_warning("queue full") == '110 isales-gateway "Response is stale: queue full"'


def test_a_leader_reuses_only_a_fresh_answer_stored_at_or_after_since() -> None:
    entry = stored()
    assert reusable(entry, 0.0, 110.0)
    assert reusable(entry, 100.0, 110.0)
    assert not reusable(entry, 100.5, 110.0)  # older than the no-cache caller accepts
    assert not reusable(entry, 0.0, 130.0)  # stale: a call is due
