"""The upstream simulator in its own process, plus the arrival times the bench reads.

``GET /__bench/arrivals`` lists ``arrival`` (the simulator clock's monotonic seconds, the
system's CLOCK_MONOTONIC, so comparable with the bench's ``time.monotonic``) of the requests
it kept (the last 1,000), from the simulator's own ``SIM_STATE``.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from gateway.simulator import SIM_STATE, add_arguments, config_from_args, create_simulator_app


async def arrivals(request: web.Request) -> web.Response:
    received = request.app[SIM_STATE].received
    return web.json_response({"arrivals": [r.arrival for r in received]})


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.sim")
    add_arguments(parser)
    config = config_from_args(parser.parse_args())
    app = create_simulator_app(config)
    app.router.add_get("/__bench/arrivals", arrivals)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        handler_cancellation=config.abort_on_hangup,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
