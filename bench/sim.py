"""The upstream simulator in its own process, plus the arrival times the bench reads.

``GET /__bench/arrivals`` lists ``arrival`` (the simulator clock's monotonic seconds, the
system's CLOCK_MONOTONIC, so comparable with the bench's ``time.monotonic``) of the requests
it kept (the last 1,000), from the simulator's own ``SIM_STATE``, and ``answered``: when the
simulator had written each answer of the vendor's route (since the last reset, in order), so
the time a client adds after the upstream answered is measured from the answer itself.

NGINX, the peer the bench compares with, cannot compute the vendor's AK/SK signature. A request
that carries ``X-Bench-Unsigned`` is signed here, on arrival, with the simulator's own keys,
so the same stand-in upstream (arrivals, limit observer, violations) serves both; the gateway's
requests never carry it and are checked as always.

The vendor is another machine; here it shares 2 CPUs with the gateway, Redis and the load. It
stamps arrivals when its event loop gets to them (``gateway.simulator.app``), so when starved
it stamped a batch up to 0.55 s late and counted violations the wire never saw. The process
therefore asks for a higher CPU weight (nice -10, kept by its worker thread) where allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.signing import authorization, format_timestamp
from gateway.simulator import SIM_STATE, add_arguments, config_from_args, create_simulator_app

UNSIGNED = "X-Bench-Unsigned"


ANSWERED = web.AppKey("answered", list[float])


async def arrivals(request: web.Request) -> web.Response:
    received = request.app[SIM_STATE].received
    answered = request.app[ANSWERED]
    return web.json_response({"arrivals": [r.arrival for r in received], "answered": answered})


@web.middleware
async def note_answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The vendor's route writes its answer itself: note when it was written."""
    if request.path.startswith("/__"):
        if request.path == "/__sim/reset":
            request.app[ANSWERED].clear()
        return await handler(request)
    try:
        return await handler(request)
    finally:
        request.app[ANSWERED].append(time.monotonic())


@web.middleware
async def sign_for_the_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    if UNSIGNED not in request.headers:
        return await handler(request)
    config = request.app[SIM_STATE].config
    body = await request.read()
    headers = {"host": request.headers.get("Host", "")}
    signed = authorization(
        ak=config.ak,
        sk=config.sk,
        timestamp=format_timestamp(time.time()),
        method=request.method,
        path=request.rel_url.raw_path,
        headers=headers,
        body=body,
    )
    # aiohttp clones only unread requests, and signing needs the body: swap the headers in
    # (``headers`` is a cached property, hence ``_cache``). Bench-only.
    headers_now = CIMultiDictProxy(CIMultiDict({**request.headers, "Authorization": signed}))
    request._headers = headers_now
    request._cache["headers"] = headers_now
    return await handler(request)


def favour_the_stand_in(niceness: int = -10) -> None:
    """Raise this process's CPU weight, before any thread starts (Linux: threads inherit it);
    without the privilege (``CAP_SYS_NICE``) it runs as it is."""
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, niceness)


def main() -> None:
    favour_the_stand_in()
    parser = argparse.ArgumentParser(prog="bench.sim")
    add_arguments(parser)
    config = config_from_args(parser.parse_args())
    app = create_simulator_app(config)
    app[ANSWERED] = []
    app.middlewares.append(note_answered)
    app.middlewares.append(sign_for_the_peer)
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
