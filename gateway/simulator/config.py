"""The simulator's settings: one frozen object, and the command-line flags that build it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from datetime import date


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated CC-iSales upstream behaves at start-up.

    Times are in the unit their name says. ``error_rate`` and ``timeout_rate`` are fractions
    of requests (0..1). Campaign ids ``1..campaigns`` exist, each in one VDN: campaign ``c``
    belongs to ``vdn_ids[(c - 1) % len(vdn_ids)]`` (asked through another, it does not exist).
    ``seed`` and ``today`` fix the synthetic data (``dataset.DOCUMENT_SEED`` adds the
    document's sample), so the same settings and simulated time give the same bytes; the
    simulated time is ``today`` 00:00 plus the time since start. ``path_prefix`` mounts the
    vendor route under a path (``/isales`` serves ``/isales/rest/isales/...``), as behind a
    reverse proxy.
    """

    host: str = "127.0.0.1"
    port: int = 18080
    ak: str = "demo-ak"
    sk: str = "demo-sk-change-me"
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 60.0
    enforce_limits: bool = False
    # A servlet container keeps working on a request whose client hung up, and the vendor
    # counts it in flight until it ends; True stops the handler on hang-up instead.
    abort_on_hangup: bool = False
    max_concurrent: int = 10
    window_ms: float = 1000.0
    max_skew_s: float = 900.0
    campaigns: int = 1000
    seed: int = 20240101
    today: str = "2026-06-30"
    vdn_ids: tuple[int, ...] = (11,)
    path_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "hang_s", "max_skew_s"):
            _check(name, getattr(self, name), 0.0, math.inf)
        for name in ("error_rate", "timeout_rate"):
            _check(name, getattr(self, name), 0.0, 1.0)
        _check("window_ms", self.window_ms, 1e-9, math.inf)
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if self.campaigns < 0:
            raise ValueError("campaigns must not be negative")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        date.fromisoformat(self.today)  # raises ValueError on a bad date
        if not self.vdn_ids or not all(1 <= v <= 9999 for v in self.vdn_ids):
            raise ValueError("vdn_ids must be one or more vdnIds, each 1..9999")
        prefix = self.path_prefix
        if prefix and (not prefix.startswith("/") or prefix.endswith("/") or "{" in prefix):
            raise ValueError("path_prefix must be empty or like /prefix (no trailing slash)")

    def owner(self, campaign_id: int) -> int:
        """The vdnId campaign ``campaign_id`` belongs to."""
        return self.vdn_ids[(campaign_id - 1) % len(self.vdn_ids)]


def _check(name: str, value: float, low: float, high: float) -> None:
    if math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags to ``parser``; defaults come from ``SimulatorConfig``."""
    d = SimulatorConfig()
    add = parser.add_argument
    add("--host", default=d.host, help="interface to listen on (default %(default)s)")
    add("--port", type=int, default=d.port, help="port to listen on (default %(default)s)")
    add("--ak", default=d.ak, help="access key the simulator accepts (default %(default)s)")
    add("--sk", default=d.sk, help="secret key of that AK (demo default; change it)")
    add("--latency-ms", type=float, default=d.latency_ms, help="fixed delay per request")
    add("--jitter-ms", type=float, default=d.jitter_ms, help="extra uniform(0, N) ms delay")
    add("--error-rate", type=float, default=d.error_rate, help="fraction answered 500/503")
    add("--timeout-rate", type=float, default=d.timeout_rate, help="fraction that hang")
    add("--hang-s", type=float, default=d.hang_s, help="how long a hanging request hangs")
    add(
        "--enforce-limits",
        action="store_true",
        default=d.enforce_limits,
        help="answer HTTP 429 to requests beyond the vendor's limit (default: only count them)",
    )
    add(
        "--abort-on-hangup",
        action="store_true",
        default=d.abort_on_hangup,
        help="stop work on a request whose client hung up (default: it runs on and counts "
        "in flight, as a servlet container does)",
    )
    add("--max-concurrent", type=int, default=d.max_concurrent, help="vendor concurrency limit")
    add("--window-ms", type=float, default=d.window_ms, help="window for request starts")
    add("--max-skew-s", type=float, default=d.max_skew_s, help="signature freshness window")
    add("--campaigns", type=int, default=d.campaigns, help="campaign ids 1..N exist")
    add("--seed", type=int, default=d.seed, help="seed of the synthetic data and behaviours")
    add(
        "--vdn-ids",
        type=_vdn_ids,
        default=d.vdn_ids,
        help="comma-separated vdnIds the campaigns belong to, in turn (default 11)",
    )
    add("--path-prefix", default=d.path_prefix, help="serve the vendor route under this path")


def _vdn_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of vdnIds: {text!r}") from None


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """A ``SimulatorConfig`` from parsed flags; absent attributes keep their defaults.

    Raises ``ValueError`` if a value is out of range.
    """
    names = {f.name for f in fields(SimulatorConfig)}
    return SimulatorConfig(**{k: v for k, v in vars(ns).items() if k in names})
