"""Who gets the next upstream permit: weighted fair queuing between callers.

Pure (no I/O, no event loop; times are passed in) and generic over the waiter item, so every
limiter backend can keep its local waiters here and ask it whom to serve next.

The rule is start-time fair queuing (Goyal et al., SFQ) over per-caller queues:

- each caller has its own FIFO queue and a virtual finish tag; a caller's head waiter gets the
  start tag ``max(v, finish)``, the next grant goes to the smallest start tag (ties: the
  waiter that joined first), and a grant moves the caller's finish tag by ``1 / weight`` and
  the virtual time ``v`` to the start tag it served. Backlogged callers therefore get grants
  in proportion to their weights; a caller alone gets every grant (work-conserving), and a
  caller returning after a pause starts at ``v``: no credit for idle time, no debt either;
- a caller at its ``max_in_flight`` cap is skipped until one of its permits is finished;
- each caller's queue is bounded on its own (its policy's ``max_queue``, else the default),
  so a flood fills only the flooder's queue; ``max_total`` is an optional safety bound over
  all callers (the caller set is bounded by configuration, so the limiters leave it unset);
- ``background`` waiters (refresh-ahead) are served only while no caller waits at all, and
  never hold more than ``background_max`` permits nor take more than ``background_max``
  grants per ``window_s``.

The scheduler decides order and caps only: whether the upstream budget has room (the window
and the concurrency) is the limiter's question, asked before ``next``. A backend uses it so:
``ready`` + ``started`` to grant at once when nobody waits, else ``join`` (``QueueFull``),
then on every release, join and window tick ``next`` while the budget has room, ``finished``
on release and ``leave`` on timeout or cancellation. A fleet-wide backend keeps its replica's
waiters here and, per caller in ``order()``, lets the shared store decide whether that caller
may start now, then grants its head with ``next_for(caller)``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from gateway.errors import QueueFull

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True, slots=True)
class CallerPolicy:
    """One caller's share: ``weight`` (> 0), optional caps on permits held and on waiters."""

    weight: float = 1.0
    max_in_flight: int | None = None
    max_queue: int | None = None


DEFAULT_POLICY: Final = CallerPolicy()


def same_policy(_caller: str) -> CallerPolicy:
    """Every caller the default share (no callers file)."""
    return DEFAULT_POLICY


@dataclass(frozen=True, slots=True)
class Turn(Generic[T]):
    """A grant decided by ``next``: whose waiter, and whether it was a background one."""

    caller: str
    item: T
    background: bool = False


class _Flow(Generic[T]):
    __slots__ = ("finish", "in_flight", "queue")

    def __init__(self) -> None:
        self.queue: deque[tuple[int, T]] = deque()  # (join sequence, item), in join order
        self.in_flight = 0
        self.finish = 0.0  # virtual finish tag of this caller's last grant


class FairScheduler(Generic[T]):
    """Per-caller queues of waiters and the fair order of their grants; see the module doc.

    ``budget`` starts per ``window_s`` is used for ``Retry-After`` estimates and for the
    background share's window only. ``policy`` maps a caller name to its ``CallerPolicy``
    (looked up on every decision, so a reloaded callers file applies at once).
    """

    def __init__(
        self,
        *,
        budget: int,
        window_s: float,
        max_queue: int,
        policy: Callable[[str], CallerPolicy] | None = None,
        background_max: int = 0,
        max_total: int | None = None,
    ) -> None:
        self.budget = budget
        self.window_s = window_s
        self.max_queue = max_queue
        self.background_max = background_max
        self.max_total = max_total
        self._policy = policy or same_policy
        self._flows: dict[str, _Flow[T]] = {}
        self._where: dict[T, str] = {}  # queued caller item -> its caller
        self._waiting = 0  # caller waiters (background excluded)
        self._v = 0.0
        self._seq = itertools.count()
        self._background: deque[tuple[str, T]] = deque()
        self._bg_in_flight = 0
        self._bg_grants: deque[float] = deque()  # times of background grants, in order

    # -- joining and leaving ------------------------------------------------------------

    def join(self, caller: str, item: T, *, background: bool = False) -> None:
        """Queue ``item`` for ``caller``. Raises ``QueueFull`` (with this caller's honest
        ``retry_after``) when the caller's own bound, or the safety bound, is reached."""
        if background:
            # Refreshes are optional work: with no share, or a window's worth queued, skip.
            if self.background_max == 0 or len(self._background) >= self.budget:
                raise QueueFull(self.window_s)
            self._background.append((caller, item))
            return
        flow = self._flows.get(caller)
        queued = 0 if flow is None else len(flow.queue)
        over_total = self.max_total is not None and self._waiting >= self.max_total
        if queued >= self._bound(caller) or over_total:
            raise QueueFull(self.retry_after(caller))
        if flow is None:
            flow = self._flows[caller] = _Flow()
        flow.queue.append((next(self._seq), item))
        self._where[item] = caller
        self._waiting += 1

    def leave(self, item: T) -> bool:
        """Take a waiter out (it timed out or went away); False if it was not waiting."""
        caller = self._where.pop(item, None)
        if caller is None:
            for waiting in self._background:
                if waiting[1] == item:
                    self._background.remove(waiting)
                    return True
            return False
        flow = self._flows[caller]
        for entry in flow.queue:
            if entry[1] == item:
                flow.queue.remove(entry)
                break
        self._waiting -= 1
        self._prune(caller, flow)
        return True

    # -- granting -----------------------------------------------------------------------

    def ready(self, caller: str, now: float, *, background: bool = False) -> bool:
        """Would a new waiter of ``caller`` be served at once (given room in the budget)?
        Nobody waits ahead of it and its caps allow. Lets a limiter grant without queuing."""
        if background:
            return self._waiting == 0 and not self._background and self._background_room(now)
        return self._waiting == 0 and self._under_cap(caller)

    def next(self, now: float) -> Turn[T] | None:
        """The waiter to grant now, taken out of its queue and counted as started; None when
        nobody waits or every waiting caller is at its cap. Call only when the budget has
        room for one more start."""
        best: tuple[float, int, str] | None = None
        for caller, flow in self._flows.items():
            if not flow.queue or not self._under_cap(caller):
                continue
            key = (max(self._v, flow.finish), flow.queue[0][0], caller)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is not None:
            return self.next_for(best[2])
        if self._waiting == 0 and self._background and self._background_room(now):
            caller, item = self._background.popleft()
            self.started(caller, now, background=True)
            return Turn(caller, item, background=True)
        return None

    def next_live(self, now: float, live: Callable[[T], bool]) -> Turn[T] | float:
        """``next``, for a backend whose waiters may go away before leaving their queue: a turn
        whose item is not ``live`` (cancelled, expired) is finished and skipped. With no turn
        to give, when to ask again: ``background_wake`` (``inf``: at a release or a join).
        Call only when the budget has room for one more start."""
        while (turn := self.next(now)) is not None:
            if live(turn.item):
                return turn
            self.finished(turn.caller, background=turn.background)
        return self.background_wake(now)

    def order(self) -> list[str]:
        """Callers with a grantable waiter (not at their cap), in the order ``next`` would
        serve them if nobody joined meanwhile: for a backend that asks a shared store
        (Redis) which of its callers may start, fleet-wide, before granting locally."""
        ranked = sorted(
            (max(self._v, flow.finish), flow.queue[0][0], caller)
            for caller, flow in self._flows.items()
            if flow.queue and self._under_cap(caller)
        )
        return [caller for _, _, caller in ranked]

    def next_for(self, caller: str) -> Turn[T] | None:
        """``caller``'s head waiter, taken out and counted as started as ``next`` would (None
        if it has none): when the turn was decided elsewhere (fleet-wide, per caller)."""
        flow = self._flows.get(caller)
        if flow is None or not flow.queue:
            return None
        start = max(self._v, flow.finish)
        _, item = flow.queue.popleft()
        del self._where[item]
        self._waiting -= 1
        flow.in_flight += 1
        flow.finish = start + 1.0 / self._weight(caller)
        self._v = max(self._v, start)
        return Turn(caller, item)

    def started(self, caller: str, now: float, *, background: bool = False) -> None:
        """A permit was granted to ``caller`` without queuing (see ``ready``)."""
        if background:
            self._bg_in_flight += 1
            self._bg_grants.append(now)
            return
        flow = self._flows.get(caller)
        if flow is None:
            flow = self._flows[caller] = _Flow()
        flow.in_flight += 1

    def finished(self, caller: str, *, background: bool = False) -> None:
        """A permit of ``caller`` was given back."""
        if background:
            self._bg_in_flight -= 1
            return
        flow = self._flows.get(caller)
        if flow is None or flow.in_flight <= 0:
            raise ValueError(f"caller {caller!r} holds no permit")
        flow.in_flight -= 1
        self._prune(caller, flow)

    # -- reading ------------------------------------------------------------------------

    def queued(self, caller: str | None = None) -> int:
        """Waiters of ``caller``; with None, every waiter including background ones."""
        if caller is None:
            return self._waiting + len(self._background)
        flow = self._flows.get(caller)
        return 0 if flow is None else len(flow.queue)

    def drain(self) -> list[T]:
        """Take every waiter out (callers' and background ones), e.g. at shutdown."""
        items = [item for flow in self._flows.values() for _, item in flow.queue]
        items += [item for _, item in self._background]
        for caller, flow in list(self._flows.items()):
            flow.queue.clear()
            self._prune(caller, flow)
        self._background.clear()
        self._where.clear()
        self._waiting = 0
        return items

    def queued_by_caller(self) -> dict[str, int]:
        return {caller: len(flow.queue) for caller, flow in self._flows.items() if flow.queue}

    def in_flight(self, caller: str) -> int:
        flow = self._flows.get(caller)
        return 0 if flow is None else flow.in_flight

    @property
    def waiting(self) -> int:
        """Caller waiters (background ones excluded)."""
        return self._waiting

    def ahead(self, caller: str, position: int | None = None) -> int:
        """How many grants come before ``caller``'s waiter at ``position`` in its own queue
        (default: a new waiter at the end) when every waiting caller gets its fair share."""
        flow = self._flows.get(caller)
        mine = 0 if flow is None else len(flow.queue)
        position = mine if position is None else position
        turns = position + 1  # this caller's grants up to and including the waiter
        weight = self._weight(caller)
        others = 0
        for name, other in self._flows.items():
            if name != caller and other.queue:
                share = math.ceil(turns * self._weight(name) / weight)
                others += min(len(other.queue), share)
        return position + others

    def retry_after(self, caller: str, position: int | None = None) -> float:
        """Seconds until that waiter's turn, from ``ahead`` and the budget per window."""
        return (self.ahead(caller, position) // self.budget + 1) * self.window_s

    def background_wake(self, now: float) -> float:
        """When background waiters that only the share's window holds back may go (else inf)."""
        blocked = (
            self._waiting == 0 and self._background and self._bg_in_flight < self.background_max
        )
        if blocked and len(self._bg_grants) >= self.background_max and self._bg_grants:
            return self._bg_grants[0] + self.window_s
        return math.inf

    # -- internals ----------------------------------------------------------------------

    def _weight(self, caller: str) -> float:
        return self._policy(caller).weight

    def _bound(self, caller: str) -> int:
        cap = self._policy(caller).max_queue
        return self.max_queue if cap is None else cap

    def _under_cap(self, caller: str) -> bool:
        cap = self._policy(caller).max_in_flight
        return cap is None or self.in_flight(caller) < cap

    def _background_room(self, now: float) -> bool:
        while self._bg_grants and self._bg_grants[0] <= now - self.window_s:
            self._bg_grants.popleft()
        return (
            self._bg_in_flight < self.background_max and len(self._bg_grants) < self.background_max
        )

    def _prune(self, caller: str, flow: _Flow[T]) -> None:
        # A finish tag at or behind v carries no information (the next start is v anyway).
        if not flow.queue and flow.in_flight == 0 and flow.finish <= self._v:
            del self._flows[caller]
