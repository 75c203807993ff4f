"""The upstream circuit breaker on a manual clock."""

from __future__ import annotations

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.clock import ManualClock


def make() -> tuple[CircuitBreaker, ManualClock]:
    clock = ManualClock()
    return CircuitBreaker(failures=3, open_s=10.0, clock=clock), clock


def test_it_opens_after_consecutive_failures_only() -> None:
    breaker, _ = make()
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == 10.0


def test_after_the_open_time_exactly_one_probe_goes_out() -> None:
    breaker, clock = make()
    for _ in range(3):
        breaker.failure()
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_a_successful_probe_closes_and_a_failed_one_reopens() -> None:
    breaker, clock = make()
    for _ in range(3):
        breaker.failure()
    clock.advance(10.0)
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(10.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_an_abandoned_probe_lets_the_next_one_through() -> None:
    breaker, clock = make()
    for _ in range(3):
        breaker.failure()
    clock.advance(10.0)
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()
