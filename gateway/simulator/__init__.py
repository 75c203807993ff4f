"""A stand-in for the vendor's CC-iSales callresult server, for demos and tests.

It answers the vendor route with deterministic synthetic data, checks the C2 signature and
the vendor's parameter rules, can be made slow, flaky or hanging (live, via
``POST /__sim/behaviour``), and measures on its own clock, at arrival, whether its callers
keep the vendor's limit (``GET /__sim/stats``, ``POST /__sim/reset``).
"""

from gateway.simulator.app import SIM_STATE, create_simulator_app, run_simulator
from gateway.simulator.config import SimulatorConfig, add_arguments, config_from_args

__all__ = [
    "SIM_STATE",
    "SimulatorConfig",
    "add_arguments",
    "config_from_args",
    "create_simulator_app",
    "run_simulator",
]
