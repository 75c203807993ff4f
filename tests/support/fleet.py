"""A fleet on localhost for tests and the benchmark: simulator and gateway replica processes."""

from __future__ import annotations

from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulator import SimulatorConfig
from tests.support.processes import Process, free_port

SIM = SimulatorConfig()  # the simulator's default AK/SK, which the replicas sign with
JSON = {"Content-Type": "application/json; charset=UTF-8"}


def path(campaign: int, vdn: int = 11) -> str:
    """The callresult route of one campaign."""
    return f"/rest/isales/v1/openapi/campaigns/{vdn}/callresult/{campaign}"


def start_simulator_process(*flags: str) -> Process:
    """The simulator in a process of its own, so its limit observer has its own clock.

    At a higher CPU priority (nice -10 where allowed), as the vendor on a machine of its own
    would be: starved by the gateways and Redis on a busy CI machine, its loop stamped a batch
    of arrivals late and counted violations that the gateway's writes did not commit (README
    "The vendor's limit, as the gateway reads it")."""
    port = free_port()
    args = ["simulate", "--port", str(port), "--ak", SIM.ak, "--sk", SIM.sk, *flags]
    return Process(args, port, niceness=-10)


def gateway_environ(port: int, upstream_url: str, **settings: str) -> dict[str, str]:
    """A served gateway on ``port`` in front of the simulator at ``upstream_url``.

    ``settings`` are extra settings as ``section__key=value``.
    """
    env = {
        "GATEWAY_SERVER__HOST": "127.0.0.1",
        "GATEWAY_SERVER__PORT": str(port),
        "GATEWAY_UPSTREAM__URL": upstream_url,
        "GATEWAY_UPSTREAM__AK": SIM.ak,
        "GATEWAY_UPSTREAM__SK": SIM.sk,
        "GATEWAY_UPSTREAM__ALLOW_HTTP": "true",
    }
    env.update({f"GATEWAY_{k.upper()}": v for k, v in settings.items()})
    return env


def replica_environ(
    port: int, upstream_url: str, redis_url: str, **settings: str
) -> dict[str, str]:
    """A replica in Redis mode in front of the simulator, caller auth off (no callers file)."""
    return gateway_environ(
        port, upstream_url, redis__url=redis_url, auth__enabled="false", **settings
    )


def start_replica(upstream: Process, redis_url: str, **settings: str) -> Process:
    """A replica process; logs warnings only unless ``log__level`` says otherwise."""
    port = free_port()
    settings = {"log__level": "WARNING", **settings}
    return Process(["serve"], port, env=replica_environ(port, upstream.url, redis_url, **settings))


async def sim_stats(upstream: Process) -> dict[str, object]:
    async with ClientSession() as session, session.get(upstream.url + "/__sim/stats") as r:
        stats: dict[str, object] = await r.json()
        return stats


async def replica_metric(replica: Process, sample: str, **labels: str) -> float:
    """The sum of a replica's ``sample`` values (e.g. ``isales_gateway_queue_depth``) whose
    labels include ``labels``; 0 if it has none."""
    async with ClientSession() as session, session.get(replica.url + "/metrics") as r:
        text = await r.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )
