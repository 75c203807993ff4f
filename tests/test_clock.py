"""The re-armable timer (``Rearm``) on a manual clock: one timer, at the earliest due time."""

from __future__ import annotations

from gateway.clock import ManualClock, Rearm


def make_rearm(clock: ManualClock) -> tuple[Rearm, list[float]]:
    fired: list[float] = []
    return Rearm(clock, lambda: fired.append(clock.monotonic())), fired


def test_arming_twice_keeps_the_earlier_due_time_and_fires_once() -> None:
    clock = ManualClock()
    timer, fired = make_rearm(clock)

    timer.arm(2.0)
    timer.arm(1.0)
    timer.arm(3.0)
    clock.advance(5.0)

    assert fired == [1.0]


def test_a_cancelled_timer_does_not_fire_and_can_be_armed_later() -> None:
    clock = ManualClock()
    timer, fired = make_rearm(clock)

    timer.arm(1.0)
    timer.cancel()
    clock.advance(2.0)
    assert fired == []

    timer.arm(4.0)
    clock.advance(5.0)
    assert fired == [4.0]


def test_the_callback_may_rearm_the_timer_for_a_later_time() -> None:
    clock = ManualClock()
    fired: list[float] = []

    def again() -> None:
        fired.append(clock.monotonic())
        if len(fired) < 3:
            timer.arm(clock.monotonic() + 1.0)

    timer = Rearm(clock, again)
    timer.arm(1.0)
    clock.advance(10.0)

    assert fired == [1.0, 2.0, 3.0]
