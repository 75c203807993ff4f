"""The request path's counters and histograms are scraped exactly as prometheus_client's own."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.loop_metrics import LoopCounter, LoopHistogram
from gateway.metrics import LATENCY_BUCKETS

CREATED = re.compile(rb"^(\S+_created\{[^}]*\}) \S+$", re.MULTILINE)
OBSERVED = (0.0, 0.0004, 0.0005, 0.0006, 0.01, 0.05, 0.7, 5.0, 61.0, 1e9)


def scraped(registry: CollectorRegistry) -> bytes:
    """The exposition, with each ``_created`` series' time (when it was made) left out."""
    return CREATED.sub(rb"\1 T", generate_latest(registry))


def test_a_loop_counter_and_histogram_scrape_as_prometheus_clients_own() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("x_requests", "Requests.", ["route", "cache"], registry=theirs)
    histogram = Histogram(
        "x_duration_seconds", "Time.", ["route"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    loop_counter = LoopCounter("x_requests", "Requests.", ["route", "cache"], ours)
    loop_histogram = LoopHistogram(
        "x_duration_seconds", "Time.", ["route"], ours, buckets=LATENCY_BUCKETS
    )

    for labels, amount in ((("a", "HIT"), 1), (("a", "MISS"), 0), (("b", "HIT"), 2.5)):
        counter.labels(*labels).inc(amount)
        loop_counter.labels(*labels).inc(amount)
    for route in ("a", "b"):
        for value in OBSERVED:
            histogram.labels(route).observe(value)
            loop_histogram.labels(route).observe(value)

    assert scraped(ours) == scraped(theirs)
    assert ours.get_sample_value("x_requests_total", {"route": "b", "cache": "HIT"}) == 2.5
    assert ours.get_sample_value("x_duration_seconds_bucket", {"route": "a", "le": "0.0005"}) == 3


def test_a_series_is_one_object_per_label_set() -> None:
    family = LoopCounter("x", "X.", ["a"], CollectorRegistry())

    family.labels("1").inc()
    family.labels("1").inc()

    assert family.labels("1") is family.labels("1")
    assert family.labels("1").value == 2


def test_misuse_is_refused() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("x", "X.", ["a", "b"], registry)
    histogram = LoopHistogram("y", "Y.", ["a"], registry, buckets=(1.0, 2.0))

    with pytest.raises(ValueError, match="labels"):
        counter.labels("only one")
    with pytest.raises(ValueError, match="labels"):
        histogram.labels("a", "b")
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("1", "2").inc(-1)
    with pytest.raises(ValueError, match="ascend"):
        LoopHistogram("z", "Z.", [], registry, buckets=(2.0, 1.0))
    with pytest.raises(ValueError, match="Duplicated"):
        LoopCounter("x", "X again.", ["a", "b"], registry)  # the registry refuses a twin
