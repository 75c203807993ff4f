"""The ``isales-gateway`` command: serve, simulate, demo, check-config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from gateway import __version__
from gateway.app import create_app
from gateway.errors import ConfigError
from gateway.front import GatewayRunner
from gateway.logs import setup_logging
from gateway.settings import ConfigErrors, Settings, load_settings
from gateway.simulator import (
    SimulatorConfig,
    add_arguments,
    config_from_args,
    create_simulator_app,
    run_simulator,
)
from gateway.state import PARTS
from gateway.vendor import REQUEST_CONTENT_TYPE, callresult_path

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isales-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML file (environment GATEWAY_* overrides it)")
    check = commands.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", help="TOML file (environment GATEWAY_* overrides it)")
    simulate = commands.add_parser("simulate", help="run the upstream simulator")
    add_arguments(simulate)
    demo = commands.add_parser("demo", help="run simulator + gateway on localhost, no Redis")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument("--sim-port", type=int, default=18080, help="simulator port")
    demo.add_argument("--latency-ms", type=float, default=300.0, help="simulated upstream latency")
    return parser


def _load(path: str | None, environ: dict[str, str] | None = None) -> Settings:
    """The settings, or every problem on stderr (one line each) and exit status 2."""
    try:
        return load_settings(path, environ)
    except ConfigError as exc:
        problems = exc.problems if isinstance(exc, ConfigErrors) else [exc]
        for problem in problems:
            print(f"isales-gateway: configuration error: {problem.message}", file=sys.stderr)
        raise SystemExit(2) from exc


def _cannot_listen(host: str, port: int, exc: OSError, hint: str = "") -> SystemExit:
    """One log line (JSON when configured), no traceback; the exit status 1 to raise."""
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
    if hint:
        reason = f"{reason} ({hint})"
    log.error(
        "cannot listen on %s:%d: %s",
        host,
        port,
        reason,
        extra={"event": "startup_failed", "host": host, "port": port, "error": reason},
    )
    return SystemExit(1)


async def _install_sighup(app: web.Application) -> None:
    """SIGHUP reloads the callers file and the admin key; it never stops the process."""
    app[PARTS].reloader.install_sighup(asyncio.get_running_loop())


def _startup_line(settings: Settings) -> None:
    lim = settings.limit
    log.info(
        "isales-gateway %s starting on %s:%d; mode %s; upstream %s; limit %d per %d+%d ms, "
        "queue %d, wait %d ms",
        __version__,
        settings.server.host,
        settings.server.port,
        "embedded (single instance)" if settings.embedded else "redis",
        settings.upstream.url,
        lim.max_concurrent,
        lim.window_ms,
        lim.margin_ms,
        lim.max_queue,
        lim.max_wait_ms,
        extra={
            "mode": "embedded" if settings.embedded else "redis",
            "upstream": settings.upstream.url,
            "max_concurrent": lim.max_concurrent,
            "window_ms": lim.window_ms,
            "margin_ms": lim.margin_ms,
            "max_queue": lim.max_queue,
            "max_wait_ms": lim.max_wait_ms,
            "auth": settings.auth.enabled,
        },
    )
    if not settings.auth.enabled:
        log.warning("auth.enabled is false: any caller that reaches this port may query")
    if settings.embedded:
        log.warning(
            "redis.url is empty: embedded single-instance mode; the upstream limit and the "
            "cache hold for this process only, so run exactly one replica"
        )


def serve(path: str | None) -> None:
    settings = _load(path)
    setup_logging(settings.log.level, settings.log.format)
    _startup_line(settings)
    app = create_app(settings, config_file=path)
    app.on_startup.append(_install_sighup)
    try:
        asyncio.run(_serve(app, settings))
    except ConfigError as exc:  # found at start-up, e.g. Redis's eviction policy
        log.error("configuration error: %s", exc.message)
        raise SystemExit(2) from exc
    except OSError as exc:
        raise _cannot_listen(settings.server.host, settings.server.port, exc) from None


async def _serve(app: web.Application, settings: Settings) -> None:
    """Serve ``app`` through the front door until SIGINT or SIGTERM, then shut down gracefully
    (stop accepting, drain, let calls at the vendor end within ``server.shutdown_timeout_s``)."""
    runner = GatewayRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_s,
        # A caller that hangs up leaves the queue instead of spending an upstream slot.
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        host, port = settings.server.host, settings.server.port
        await web.TCPSite(runner, host, port, backlog=settings.server.backlog).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def check_config(path: str | None) -> int:
    settings = _load(path)
    mode = "embedded (single instance)" if settings.embedded else "redis"
    print(f"configuration OK: upstream {settings.upstream.url}, mode {mode}")
    return 0


def demo_environ(port: int, sim: SimulatorConfig) -> dict[str, str]:
    """The embedded demo defaults; the caller's GATEWAY_* variables still win."""
    defaults = {
        "GATEWAY_SERVER__HOST": "127.0.0.1",
        "GATEWAY_SERVER__PORT": str(port),
        "GATEWAY_UPSTREAM__URL": f"http://{sim.host}:{sim.port}",
        "GATEWAY_UPSTREAM__AK": sim.ak,
        "GATEWAY_UPSTREAM__SK": sim.sk,
        "GATEWAY_UPSTREAM__ALLOW_HTTP": "true",
        "GATEWAY_AUTH__ENABLED": "false",
    }
    given = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
    return defaults | given


async def _run_demo(settings: Settings, sim: SimulatorConfig) -> None:
    gateway_app = create_app(settings)
    runners = [
        (
            web.AppRunner(create_simulator_app(sim), handler_cancellation=sim.abort_on_hangup),
            sim.host,
            sim.port,
        ),
        (
            GatewayRunner(gateway_app, access_log=None, handler_cancellation=True),
            settings.server.host,
            settings.server.port,
        ),
    ]
    try:
        for runner, host, port in runners:
            await runner.setup()
            await web.TCPSite(runner, host, port, backlog=settings.server.backlog).start()
    except OSError as exc:
        for runner, _, _ in reversed(runners):
            await runner.cleanup()
        raise _cannot_listen(host, port, exc, "choose free ports with --port/--sim-port") from None
    base = f"http://{settings.server.host}:{settings.server.port}"
    print(
        f"isales-gateway demo: gateway {base} -> simulator http://{sim.host}:{sim.port} "
        f"(latency {sim.latency_ms:g} ms, embedded mode, no Redis)\n\n"
        "Ask it (run twice within 30 s: the second answer is a cache HIT; an open-ended "
        "query is kept cache.ttl_open_s = 30 s):\n\n"
        f"  curl -si -X POST {base}{callresult_path(11, 3)} \\\n"
        f"       -H 'Content-Type: {REQUEST_CONTENT_TYPE}' \\\n"
        '       -d \'{"pageSize": 5, "pageNum": 1}\'\n\n'
        f"Metrics: {base}/metrics   Upstream counters: http://{sim.host}:{sim.port}/__sim/stats\n"
        "Ctrl-C stops both.",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway_app[PARTS].reloader.install_sighup(loop)
    try:
        await stop.wait()
    finally:
        for runner, _, _ in reversed(runners):
            await runner.cleanup()


def demo(port: int, sim_port: int, latency_ms: float) -> None:
    sim = SimulatorConfig(port=sim_port, latency_ms=latency_ms, jitter_ms=latency_ms / 3)
    settings = _load(None, demo_environ(port, sim))
    setup_logging(settings.log.level, settings.log.format)
    _startup_line(settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_demo(settings, sim))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        serve(args.config)
    elif args.command == "check-config":
        return check_config(args.config)
    elif args.command == "simulate":
        run_simulator(config_from_args(args))
    elif args.command == "demo":
        demo(args.port, args.sim_port, args.latency_ms)
    return 0
