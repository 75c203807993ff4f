"""The upstream limit, one room: the contract (``protocol``), the fair turn order
(``scheduler``), and the backends (``memory``, ``redis_limiter`` with its Lua scripts and
their typed callers in ``redis_scripts``, ``failover``). See ``protocol`` for the map.
"""

from gateway.limiter.protocol import (
    ANONYMOUS,
    BACKGROUND,
    FleetTimings,
    LimitConfig,
    Limiter,
    LimiterSnapshot,
    Permit,
    shutting_down,
)

__all__ = [
    "ANONYMOUS",
    "BACKGROUND",
    "FleetTimings",
    "LimitConfig",
    "Limiter",
    "LimiterSnapshot",
    "Permit",
    "shutting_down",
]
