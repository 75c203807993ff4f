"""Counters and histograms for the request path, counted on the event loop's thread only.

``prometheus_client``'s children take a lock and make three checks on every ``inc`` (about
five Python calls; a histogram's ``observe`` more): on a cache hit its four updates were a
tenth of the gateway's own work. Every request is counted on the loop's thread, and the
registry is read there too (``/metrics`` renders in the handler), so these series are plain
floats in slotted objects, read by a registry collector when scraped. The exposition is
``prometheus_client``'s: ``_total`` and ``_created`` for a counter; ``_bucket`` (cumulative,
``le`` as it formats it), ``_count``, ``_sum`` and ``_created`` for a histogram.

Only for series updated from the event loop: anything counted on another thread belongs in a
``prometheus_client`` metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class Tally:
    """One counter series."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class Timing:
    """One histogram series: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ascending, +Inf last
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.sum += value


S = TypeVar("S", Tally, Timing)


class _Family(Collector, Generic[S]):
    """A labelled family registered on ``registry``: one series per label values."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        registry.register(self)

    def _new(self) -> S:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> S:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: labels {self._labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = self._new()
        return series

    def describe(self) -> Iterator[Metric]:
        """What the registry checks for a name used twice."""
        yield self._family()


class LoopCounter(_Family[Tally]):
    """A labelled counter (``name`` without ``_total``)."""

    def _new(self) -> Tally:
        return Tally()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in list(self._series.items()):
            family.add_metric(values, series.value, created=series.created)
        yield family


class LoopHistogram(_Family[Timing]):
    """A labelled histogram with ``buckets`` (ascending; +Inf is added)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must ascend")
        self._bounds = bounds if bounds and bounds[-1] == float("inf") else (*bounds, float("inf"))
        self._les = [str(floatToGoString(b)) for b in self._bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> Timing:
        return Timing(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in list(self._series.items()):
            running, buckets = 0, []
            for le, count in zip(self._les, series.counts, strict=True):
                running += count
                buckets.append((le, float(running)))
            family.add_metric(values, buckets, series.sum)
            labels = dict(zip(self._labelnames, values, strict=True))
            family.add_sample(f"{self._name}_created", labels, series.created)
        yield family
