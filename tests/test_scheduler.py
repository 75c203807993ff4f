"""The fair scheduler on its own: no event loop, times passed in.

Waiters are plain strings; ``grant`` plays the limiter: it asks for the next turn whenever the
budget has room (here: always) and the test decides when permits are finished.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from gateway.errors import QueueFull
from gateway.limiter.scheduler import CallerPolicy, FairScheduler, Turn


def make(
    policies: dict[str, CallerPolicy] | None = None,
    *,
    budget: int = 10,
    window_s: float = 1.1,
    max_queue: int = 1000,
    background_max: int = 0,
    max_total: int | None = None,
) -> FairScheduler[str]:
    table = policies or {}
    return FairScheduler(
        budget=budget,
        window_s=window_s,
        max_queue=max_queue,
        policy=lambda caller: table.get(caller, CallerPolicy()),
        background_max=background_max,
        max_total=max_total,
    )


def flood(scheduler: FairScheduler[str], caller: str, n: int) -> None:
    for i in range(n):
        scheduler.join(caller, f"{caller}{i}")


def grants(scheduler: FairScheduler[str], n: int, now: float = 0.0) -> list[Turn[str]]:
    """Up to ``n`` turns, finishing none of them."""
    turns = []
    for _ in range(n):
        turn = scheduler.next(now)
        if turn is None:
            break
        turns.append(turn)
    return turns


def callers(turns: list[Turn[str]]) -> list[str]:
    return [t.caller for t in turns]


def test_a_caller_alone_gets_every_grant_in_its_arrival_order() -> None:
    scheduler = make()
    flood(scheduler, "a", 5)
    assert [t.item for t in grants(scheduler, 10)] == ["a0", "a1", "a2", "a3", "a4"]
    assert scheduler.next(0.0) is None
    assert scheduler.queued() == 0


def test_no_grant_is_withheld_while_any_caller_waits() -> None:
    scheduler = make({"a": CallerPolicy(weight=100)})
    flood(scheduler, "a", 3)
    flood(scheduler, "b", 3)
    assert len(grants(scheduler, 10)) == 6, "work-conserving: weights order, never idle"


def test_weights_three_to_one_share_grants_within_ten_percent_of_three_to_one() -> None:
    scheduler = make({"a": CallerPolicy(weight=3), "b": CallerPolicy(weight=1)})
    flood(scheduler, "a", 900)
    flood(scheduler, "b", 900)
    count = Counter(callers(grants(scheduler, 400)))
    assert count["a"] + count["b"] == 400
    assert count["a"] / count["b"] == pytest.approx(3.0, rel=0.1)


def test_equal_callers_take_turns_so_a_late_caller_waits_behind_one_grant_not_the_flood() -> None:
    scheduler = make()
    flood(scheduler, "a", 300)
    grants(scheduler, 10)
    scheduler.join("b", "b0")
    assert "b" in callers(grants(scheduler, 2))


def test_a_caller_returning_from_idle_gets_no_credit_for_the_time_it_was_away() -> None:
    scheduler = make()
    flood(scheduler, "a", 60)
    grants(scheduler, 50)  # a alone: every grant is a's
    flood(scheduler, "b", 10)
    assert Counter(callers(grants(scheduler, 10))) == {"a": 5, "b": 5}


def test_a_flood_fills_only_the_flooders_own_queue() -> None:
    scheduler = make(max_queue=3)
    flood(scheduler, "a", 3)
    with pytest.raises(QueueFull):
        scheduler.join("a", "a3")
    scheduler.join("b", "b0")
    assert scheduler.queued("a") == 3
    assert scheduler.queued("b") == 1
    assert scheduler.queued_by_caller() == {"a": 3, "b": 1}


def test_a_callers_own_max_queue_replaces_the_default_bound() -> None:
    scheduler = make({"small": CallerPolicy(max_queue=1)}, max_queue=3)
    scheduler.join("small", "s0")
    with pytest.raises(QueueFull):
        scheduler.join("small", "s1")
    flood(scheduler, "other", 3)


def test_the_safety_bound_over_all_callers_holds_when_set() -> None:
    scheduler = make(max_queue=10, max_total=4)
    flood(scheduler, "a", 2)
    flood(scheduler, "b", 2)
    with pytest.raises(QueueFull):
        scheduler.join("c", "c0")


def test_a_caller_at_its_in_flight_cap_is_skipped_until_it_finishes_one() -> None:
    scheduler = make({"a": CallerPolicy(max_in_flight=2)})
    flood(scheduler, "a", 5)
    flood(scheduler, "b", 5)
    assert Counter(callers(grants(scheduler, 7))) == {"a": 2, "b": 5}
    assert scheduler.next(0.0) is None, "a is at its cap, b has nobody left"
    scheduler.finished("a")
    turn = scheduler.next(0.0)
    assert turn is not None
    assert turn.caller == "a"


def test_a_capped_caller_is_not_ready_and_an_uncapped_one_is_ready_only_when_nobody_waits() -> None:
    scheduler = make({"a": CallerPolicy(max_in_flight=1)})
    assert scheduler.ready("a", 0.0)
    scheduler.started("a", 0.0)
    assert not scheduler.ready("a", 0.0)
    assert scheduler.ready("b", 0.0)
    scheduler.join("c", "c0")
    assert not scheduler.ready("b", 0.0), "someone waits: a newcomer must queue behind"


def test_background_work_is_never_granted_ahead_of_a_caller() -> None:
    scheduler = make(background_max=5)
    scheduler.join("refresh", "r0", background=True)
    scheduler.join("a", "a0")
    first = scheduler.next(0.0)
    assert first == Turn("a", "a0")
    second = scheduler.next(0.0)
    assert second == Turn("refresh", "r0", background=True)


def test_background_waits_while_a_caller_waits_even_if_that_caller_is_capped() -> None:
    scheduler = make({"a": CallerPolicy(max_in_flight=1)}, background_max=5)
    scheduler.started("a", 0.0)
    scheduler.join("a", "a1")
    scheduler.join("refresh", "r0", background=True)
    assert scheduler.next(0.0) is None
    assert not scheduler.ready("refresh", 0.0, background=True)


def test_background_holds_at_most_its_share_of_permits_and_of_grants_per_window() -> None:
    scheduler = make(background_max=2, window_s=1.0)
    for i in range(5):
        scheduler.join("refresh", f"r{i}", background=True)
    assert len(grants(scheduler, 5, now=0.0)) == 2
    assert scheduler.next(0.2) is None, "two held: the in-flight share is used up"
    scheduler.finished("refresh", background=True)
    scheduler.finished("refresh", background=True)
    assert len(grants(scheduler, 5, now=0.5)) == 0, "two granted in this window already"
    assert scheduler.background_wake(0.5) == pytest.approx(1.0)
    assert len(grants(scheduler, 5, now=1.0)) == 2


def test_background_with_no_share_is_refused_at_once() -> None:
    scheduler = make(background_max=0)
    with pytest.raises(QueueFull):
        scheduler.join("refresh", "r0", background=True)
    assert not scheduler.ready("refresh", 0.0, background=True)


def test_a_waiter_that_leaves_is_never_granted() -> None:
    scheduler = make(background_max=1)
    flood(scheduler, "a", 3)
    scheduler.join("refresh", "r0", background=True)
    assert scheduler.leave("a1")
    assert scheduler.leave("r0")
    assert not scheduler.leave("a1"), "already gone"
    assert [t.item for t in grants(scheduler, 5)] == ["a0", "a2"]


def test_retry_after_counts_the_grants_fair_sharing_puts_ahead_of_this_caller() -> None:
    scheduler = make(budget=10, window_s=1.0)
    flood(scheduler, "a", 100)
    # b's first waiter: one of a's grants may come first, then b's turn.
    assert scheduler.ahead("b") == 1
    assert scheduler.retry_after("b") == pytest.approx(1.0)
    # a's next waiter: its own 100 first, and b's share of those turns (b has 3 waiting).
    flood(scheduler, "b", 3)
    assert scheduler.ahead("a") == 103
    assert scheduler.retry_after("a") == pytest.approx(11.0)


def test_retry_after_for_a_full_queue_comes_with_the_rejection() -> None:
    scheduler = make(budget=2, window_s=1.0, max_queue=4)
    flood(scheduler, "a", 4)
    with pytest.raises(QueueFull) as caught:
        scheduler.join("a", "a4")
    assert caught.value.retry_after == pytest.approx(3.0)


def test_retry_after_weighs_a_heavier_callers_share() -> None:
    scheduler = make({"heavy": CallerPolicy(weight=3)}, budget=1, window_s=1.0)
    flood(scheduler, "heavy", 50)
    assert scheduler.ahead("light") == 3


def test_finishing_a_permit_nobody_holds_is_an_error() -> None:
    scheduler = make()
    with pytest.raises(ValueError, match="holds no permit"):
        scheduler.finished("a")


def test_a_flooding_caller_is_still_served_while_others_take_turns() -> None:
    scheduler = make()
    flood(scheduler, "a", 300)
    served = []
    for i in range(20):
        scheduler.join("b", f"b{i}")
        served += callers(grants(scheduler, 2))
    assert Counter(served) == {"a": 20, "b": 20}


def test_order_lists_the_callers_next_would_serve_and_next_for_serves_one_of_them() -> None:
    scheduler = make({"capped": CallerPolicy(max_in_flight=1)})
    scheduler.started("capped", 0.0)
    scheduler.join("capped", "c0")
    flood(scheduler, "a", 3)
    grants(scheduler, 1)  # a's first: a's next turn comes after b's
    scheduler.join("b", "b0")
    assert scheduler.order() == ["b", "a"], "capped is at its cap"
    assert scheduler.next_for("a") == Turn("a", "a1")
    assert scheduler.next_for("nobody") is None
    assert scheduler.order() == ["b", "a"]
    assert scheduler.next(0.0) == Turn("b", "b0")


def test_a_turn_whose_waiter_went_away_is_skipped_and_its_grant_given_back() -> None:
    scheduler = make({"a": CallerPolicy(max_in_flight=1)})
    flood(scheduler, "a", 2)
    flood(scheduler, "b", 1)
    gone = {"a0"}  # cancelled, still in its queue
    turn = scheduler.next_live(0.0, lambda item: item not in gone)
    assert turn == Turn("b", "b0")
    assert scheduler.in_flight("a") == 0, "the skipped turn holds nothing: a's cap is free"
    assert scheduler.next_live(0.0, lambda item: item not in gone) == Turn("a", "a1")


def test_with_no_live_turn_it_says_when_to_look_again() -> None:
    scheduler = make(background_max=1, window_s=1.0)
    assert scheduler.next_live(0.0, lambda _: True) == math.inf, "nobody waits: at a join"
    scheduler.join("refresh", "r0", background=True)
    scheduler.join("refresh", "r1", background=True)
    assert scheduler.next_live(0.0, lambda _: True) == Turn("refresh", "r0", background=True)
    scheduler.finished("refresh", background=True)
    # Held back by the share's window alone: wake when the first grant leaves it.
    assert scheduler.next_live(0.5, lambda _: True) == pytest.approx(1.0)
