"""The simulated CC-iSales callresult server: aiohttp wiring and handlers.

Per request to the route, in this order: the limit observer sees the arrival; the request is
counted and recorded; 405 (not POST); 429 (limit broken, only with ``enforce_limits``); the
named behaviours (latency, hang, 5xx, a forced status, a proxy's login page); 415 (not JSON);
401 (C2 signature, ``c2``); the vendor's parameter codes (HTTP 200, ``rules``); 0200007 (no
such campaign in this VDN); the data (``dataset``). Descriptions follow the ``locale``
header (``zh_CN`` by default, ``en_US``).

The simulator is the vendor's stand-in, written from the vendor's document: it imports
nothing of the gateway but its clock (a test keeps it so).

An arrival is stamped when the handler starts, that is when this process's event loop gets to
the request, not when the kernel received it. On a host whose CPUs are busy the two part: at
load 3-5 on 2 cores a stalled loop stamped some requests 0.15-0.55 s after the sender wrote
them, moving one batch's stamps towards the next and counting violations that never happened
on the wire. An earlier hook in the loop gains nothing (``data_received`` ran within 1 ms of
the handler); only the kernel's receive time (``SO_TIMESTAMP``, which asyncio's ``recv``
discards) would. So a violation counted under CPU load is checked against the sender's own
send times before it is blamed on the sender.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, Final

from aiohttp import web

from gateway.clock import Clock, SystemClock
from gateway.simulator import c2, rules
from gateway.simulator.config import SimulatorConfig
from gateway.simulator.state import ReceivedRequest, SimulatorState

SIM_STATE: Final = web.AppKey("sim_state", SimulatorState)
ROUTE: Final = "/rest/isales/v1/openapi/campaigns/{vdnId}/callresult/{campaignId}"
VENDOR_JSON: Final = "application/json;charset=UTF-8"
LOGIN_PAGE: Final = (
    b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
    b'<body><form method="post" action="/login"><input name="user"></form></body></html>'
)


def _dumps(body: dict[str, Any]) -> bytes:
    # Compact and key-ordered as built: identical queries give identical bytes.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _json(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=_dumps(body), status=status, headers={"Content-Type": VENDOR_JSON, **headers}
    )


def _vendor_answer(code: str, locale: str | None, field: str | None = None) -> web.Response:
    """A business answer, shaped and coded like the vendor's (HTTP 200)."""
    text = rules.describe(code, locale, field)
    return _json({"resultCode": code, "resultDesc": text, "returnCode": code, "returnDesc": text})


async def callresult(request: web.Request) -> web.StreamResponse:
    """The vendor route; the observer counts it from arrival until the response is written."""
    state = request.app[SIM_STATE]
    violated = state.observer.arrive(state.clock.monotonic())
    try:
        try:
            response = await _answer(state, request, violated)
        except web.HTTPException as exc:  # e.g. a body over client_max_size
            response = _json(
                {"resultCode": f"0200{exc.status}", "resultDesc": exc.reason}, exc.status
            )
        state.responses_by_status[response.status] += 1
        # Written here, not by aiohttp after return, so in_flight covers the whole response.
        await response.prepare(request)
        await response.write_eof()
        return response
    finally:
        state.observer.depart()


async def _answer(state: SimulatorState, request: web.Request, violated: bool) -> web.Response:
    arrival = state.clock.monotonic()
    state.requests_total += 1
    body = await request.read()
    headers = {name.lower(): value for name, value in request.headers.items()}
    path = request.rel_url.raw_path
    state.record(ReceivedRequest(request.method, path, headers, body, arrival))

    if request.method != "POST":
        return _json(
            {"resultCode": "0200405", "resultDesc": "Method not allowed"}, 405, Allow="POST"
        )
    if violated and state.behaviour.enforce_limits:
        return _json(
            {"resultCode": "0200429", "resultDesc": "Too many requests"},
            429,
            **{"Retry-After": "1"},
        )
    failure = await _named_behaviours(state)
    if failure is not None:
        return failure
    if request.content_type != "application/json":
        return _json(
            {"resultCode": "0200415", "resultDesc": "Content-Type must be application/json"},
            415,
        )
    reason = c2.check(
        request.headers.get("Authorization"),
        secrets={state.config.ak: state.config.sk},
        now=state.clock.time(),
        max_skew_s=state.config.max_skew_s,
        method=request.method,
        path=path,
        query=list(request.rel_url.query.items()),
        headers=headers,
        body=body,
    )
    if reason is not None:
        state.auth_failures += 1
        return _json(
            {"resultCode": "0200401", "resultDesc": f"Authentication failed: {reason}"}, 401
        )

    locale = request.headers.get("locale")
    try:
        query = rules.read_query(
            request.match_info["vdnId"], request.match_info["campaignId"], body
        )
    except rules.Refusal as refusal:
        return _vendor_answer(refusal.code, locale, refusal.field)
    config = state.config
    if not 1 <= query.campaign_id <= config.campaigns or config.owner(query.campaign_id) != (
        query.vdn_id
    ):
        return _vendor_answer(rules.NO_CAMPAIGN, locale)
    # Building a big campaign's answer takes a while: off the event loop (one worker, so the
    # data set is never shared), so the next arrivals are seen, and stamped, when they come.
    moment = state.moment()
    body = await asyncio.get_running_loop().run_in_executor(
        state.worker, _success_body, state, query, moment, locale
    )
    return web.Response(body=body, headers={"Content-Type": VENDOR_JSON})


def _success_body(
    state: SimulatorState, query: rules.Query, moment: str, locale: str | None
) -> bytes:
    total, rows = state.dataset.query(query, moment)
    text = rules.describe(rules.SUCCESS, locale)
    return _dumps(
        {
            "resultCode": rules.SUCCESS,
            "resultDesc": text,
            "returnCode": rules.SUCCESS,
            "returnDesc": text,
            "totalCount": total,
            "data": rows,
        }
    )


async def _named_behaviours(state: SimulatorState) -> web.Response | None:
    """Delay (latency, jitter, hang) and maybe fail; a response, or None to go on.

    The rng is drawn only for behaviours that are switched on, so a quiet simulator's
    sequence of draws (and a seeded test's outcome) does not depend on unused features.
    """
    b, rng = state.behaviour, state.rng
    delay_s = b.latency_ms / 1000.0
    if b.jitter_ms > 0:
        delay_s += rng.uniform(0.0, b.jitter_ms) / 1000.0
    if b.timeout_rate > 0 and rng.random() < b.timeout_rate:
        delay_s += b.hang_s
    if delay_s > 0:
        await state.clock.sleep(delay_s)
    if b.error_rate > 0 and rng.random() < b.error_rate:
        # Deliberately not the vendor's JSON shape: a proxy or crashed server answers this way.
        return web.json_response(
            {"error": "simulated upstream failure"}, status=rng.choice((500, 503))
        )
    if b.status:
        headers = {}
        if b.status == 429 and b.retry_after_s > 0:
            headers["Retry-After"] = f"{b.retry_after_s:g}"
        body = {"resultCode": f"0200{b.status}", "resultDesc": f"Simulated HTTP {b.status}"}
        return _json(body, b.status, **headers)
    if b.login_page:
        return web.Response(body=LOGIN_PAGE, content_type="text/html", charset="utf-8")
    return None


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].stats())


async def post_reset(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.reset()
    return web.json_response(state.stats())


async def get_behaviour(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].behaviour.as_dict())


async def post_behaviour(request: web.Request) -> web.Response:
    """Apply a JSON object of behaviour changes at once, or none of them (400)."""
    state = request.app[SIM_STATE]
    try:
        changes = json.loads(await request.read())
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object")
        state.behaviour = state.behaviour.updated(changes)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.behaviour.as_dict())


def create_simulator_app(
    config: SimulatorConfig, clock: Clock | None = None, rng: random.Random | None = None
) -> web.Application:
    """A simulator app; ``clock`` defaults to the system clock, ``rng`` to ``Random(seed)``.

    Run it with ``handler_cancellation=config.abort_on_hangup`` (``run_simulator`` does): by
    default a request whose client went away runs on and counts as in flight, as at the vendor.
    """
    app = web.Application()
    if rng is None:
        rng = random.Random(config.seed)  # noqa: S311 -- reproducible simulation, not secrets
    state = app[SIM_STATE] = SimulatorState(config, clock or SystemClock(), rng)

    async def stop_worker(app: web.Application) -> None:
        state.worker.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(stop_worker)
    app.router.add_route("*", config.path_prefix + ROUTE, callresult)
    app.router.add_get("/__sim/stats", get_stats)
    app.router.add_post("/__sim/reset", post_reset)
    app.router.add_get("/__sim/behaviour", get_behaviour)
    app.router.add_post("/__sim/behaviour", post_behaviour)
    return app


def run_simulator(config: SimulatorConfig) -> None:
    """Serve the simulator until interrupted (blocking); prints where it listens."""
    line = (
        f"iSales upstream simulator listening on http://{config.host}:{config.port} "
        f"(AK {config.ak!r}, max_concurrent {config.max_concurrent} per {config.window_ms:g} ms)"
    )
    web.run_app(
        create_simulator_app(config),
        host=config.host,
        port=config.port,
        handler_cancellation=config.abort_on_hangup,
        print=lambda _default: print(line, flush=True),
    )
