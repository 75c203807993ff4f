"""The simulator's named behaviours that can change while it runs (``/__sim/behaviour``).

Pure: validation of a change set, no I/O. Starts from ``SimulatorConfig``; tests flip the
upstream to slow, flaky or hanging mid-run by posting a JSON object of changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from gateway.simulator.config import SimulatorConfig

_RATES = frozenset({"error_rate", "timeout_rate"})
_DURATIONS = frozenset({"latency_ms", "jitter_ms", "hang_s", "retry_after_s"})
_FLAGS = frozenset({"enforce_limits", "login_page"})


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Delays in their named units; rates are fractions of requests (0..1).

    ``status`` (0: off, else 300..599) answers every request with that HTTP status and a
    small JSON body (``{"resultCode": "0200<status>", ...}``), ``Retry-After: retry_after_s``
    on a 429 when that is above 0; ``login_page`` answers HTTP 200 with an HTML login page, as
    a proxy in front of the vendor would.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 60.0
    enforce_limits: bool = False
    status: int = 0
    retry_after_s: float = 0.0
    login_page: bool = False

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> Behaviour:
        return cls(
            latency_ms=config.latency_ms,
            jitter_ms=config.jitter_ms,
            error_rate=config.error_rate,
            timeout_rate=config.timeout_rate,
            hang_s=config.hang_s,
            enforce_limits=config.enforce_limits,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: Mapping[str, object]) -> Behaviour:
        """A copy with ``changes`` applied; ``ValueError`` naming the first bad key.

        Rates must be numbers in 0..1, durations finite numbers >= 0, flags booleans.
        """
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "status":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError("status must be an integer")
                if value != 0 and not 300 <= value <= 599:
                    raise ValueError("status must be 0 (off) or 300..599")
                clean[key] = value
                continue
            if key in _FLAGS:
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
                clean[key] = value
                continue
            if key not in _RATES and key not in _DURATIONS:
                raise ValueError(f"unknown behaviour: {key[:64]}")
            # bool is an int subclass; true/false is never a meaningful rate or delay.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            number = float(value)
            high = 1.0 if key in _RATES else math.inf
            if not math.isfinite(number) or not 0.0 <= number <= high:
                raise ValueError(f"{key} must be between 0 and {high}")
            clean[key] = number
        return replace(self, **clean)
