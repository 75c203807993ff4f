"""Everything one simulator instance knows and counts; reachable in-process via ``SIM_STATE``."""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

from gateway.clock import Clock
from gateway.simulator.behaviour import Behaviour
from gateway.simulator.config import SimulatorConfig
from gateway.simulator.dataset import DataSet
from gateway.simulator.observer import LimitObserver

RECEIVED_KEPT: Final = 1000


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A request that reached the route, as received.

    ``headers`` maps lowercased names to values (the last one wins if a name repeats);
    ``arrival`` is seconds on the simulator clock's ``monotonic``.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    arrival: float


class SimulatorState:
    """Settings, live behaviour, the limit observer, the data and the counters."""

    def __init__(self, config: SimulatorConfig, clock: Clock, rng: random.Random) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng
        self.behaviour = Behaviour.from_config(config)
        self.observer = LimitObserver(config.max_concurrent, config.window_ms / 1000.0)
        self.dataset = DataSet(config.seed, date.fromisoformat(config.today))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-data")
        self.started = clock.monotonic()  # simulated time: ``today`` 00:00 at this instant
        self.received: deque[ReceivedRequest] = deque(maxlen=RECEIVED_KEPT)
        self.requests_total = 0
        self.auth_failures = 0
        self.responses_by_status: Counter[int] = Counter()
        # Digests, not bodies: a long load test must not grow memory by its traffic.
        self._queries: set[bytes] = set()

    def moment(self) -> str:
        """The simulated ``callTimeStr`` now: calls up to it have completed."""
        return self.dataset.moment(self.clock.monotonic() - self.started)

    def record(self, request: ReceivedRequest) -> None:
        self.received.append(request)
        self._queries.add(hashlib.sha256(request.path.encode() + b"\0" + request.body).digest())

    def stats(self) -> dict[str, Any]:
        """The ``/__sim/stats`` document."""
        observer = self.observer
        return {
            "requests_total": self.requests_total,
            "max_in_flight": observer.max_in_flight,
            "max_starts_in_window": observer.max_starts_in_window,
            "violations": observer.violations,
            "auth_failures": self.auth_failures,
            "in_flight": observer.in_flight,
            "starts_in_window": observer.starts_in_window(self.clock.monotonic()),
            "responses_by_status": {
                str(status): n for status, n in sorted(self.responses_by_status.items())
            },
            "distinct_queries": len(self._queries),
            "max_concurrent": observer.max_concurrent,
            "window_ms": self.config.window_ms,
        }

    def reset(self) -> None:
        """Zero every counter and maximum and forget received requests; keep the behaviour."""
        self.observer.reset()
        self.received.clear()
        self.requests_total = 0
        self.auth_failures = 0
        self.responses_by_status.clear()
        self._queries.clear()
