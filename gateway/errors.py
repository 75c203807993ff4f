"""The one exception tree of the gateway.

Every error the gateway raises on purpose is a ``GatewayError``. Each class carries the HTTP
status and the gateway code its response gets; ``front.FrontDoor`` is the only place that
turns them into responses. Gateway codes start with ``GW`` so they can never clash
with the vendor's numeric codes (``0200000``, ``0200001``, ``02000006``...).

    GatewayError                      500 GW50000  unexpected (never for bad input)
    ├── ConfigError                   -            start-up: a setting is invalid
    ├── ParameterError                200 vendor   the query breaks a vendor rule (vendor code)
    ├── CallerError
    │   ├── Unauthenticated           401 GW40100  no or unknown API key
    │   ├── Forbidden                 403 GW40300  the key may not do this
    │   ├── NotFound                  404 GW40400  no such route
    │   ├── MethodNotAllowed          405 GW40500  route exists, method does not
    │   ├── BodyTooLarge              413 GW41300
    │   ├── ExpectationFailed         417 GW41700  an Expect other than 100-continue
    │   └── UnsupportedMediaType      415 GW41500
    ├── Overloaded                    503 + Retry-After
    │   ├── QueueFull                     GW50300  the wait queue is at its length bound
    │   └── QueueTimeout                  GW50301  waited the wait bound without a permit
    └── UpstreamError
        ├── UpstreamUnavailable       502 GW50200  connect error, reset, DNS
        ├── UpstreamBadResponse       502 GW50201  5xx or a body that is not the vendor's
        ├── UpstreamAuthRejected      502 GW50202  the upstream refused the gateway's AK/SK
        ├── UpstreamCircuitOpen       503 GW50302  recent attempts failed; not calling for now
        ├── UpstreamRateLimited       429 GW42900  the upstream answered 429; the fleet pauses
        │   └── UpstreamPaused            GW42901  paused after a 429: nothing sent until then
        └── UpstreamTimeout           504 GW50400
    BackendUnavailable                503 GW50310  Redis failed or timed out (internal: the cache
    │                                              fails open, the limiter falls back)
    └── PermitLost                    503 GW50311  a permit may no longer be used to send
                                                   (internal: the attempt takes a fresh one)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar, Self


class GatewayError(Exception):
    """Base of every deliberate gateway error; ``message`` is safe to show a caller."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "GW50000"
    default_message: ClassVar[str] = "Internal gateway error."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    @property
    def result_code(self) -> str:
        """The ``resultCode``/``returnCode`` of the response body."""
        return self.code

    def headers(self) -> dict[str, str]:
        """Extra response headers this error needs."""
        return {}


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, never less than 1 (0 would invite a hot loop)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class ConfigError(GatewayError):
    """A setting is missing or invalid; ``key`` names it (``section.key``)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{key}: {problem}")


class ParameterError(GatewayError):
    """The query breaks one of the vendor's rules; answered like the vendor (HTTP 200)."""

    status = 200

    def __init__(self, vendor_code: str, message: str) -> None:
        self.vendor_code = vendor_code
        super().__init__(message)

    @property
    def result_code(self) -> str:
        return self.vendor_code


class CallerError(GatewayError):
    """The caller's request cannot be served as sent."""

    status = 400
    code = "GW40000"
    default_message = "Bad request."


class Unauthenticated(CallerError):
    status = 401
    code = "GW40100"
    default_message = "Missing or unknown API key."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="isales-gateway"'}


class Forbidden(CallerError):
    status = 403
    code = "GW40300"
    default_message = "This key may not do that."


class NotFound(CallerError):
    status = 404
    code = "GW40400"
    default_message = "No such route."


class MethodNotAllowed(CallerError):
    status = 405
    code = "GW40500"
    default_message = "Method not allowed."

    def __init__(self, message: str | None = None, *, allowed: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.allowed = tuple(sorted(allowed))

    def headers(self) -> dict[str, str]:
        """``Allow``, which RFC 9110 requires on every 405, when the route's methods are known."""
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class BodyTooLarge(CallerError):
    status = 413
    code = "GW41300"
    default_message = "Request body too large."


class ExpectationFailed(CallerError):
    status = 417
    code = "GW41700"
    default_message = "Only Expect: 100-continue is supported."


class UnsupportedMediaType(CallerError):
    status = 415
    code = "GW41500"
    default_message = "Content-Type must be application/json."


class Overloaded(GatewayError):
    """No upstream permit could be had in time; the caller should retry after ``retry_after``.
    Only its subclasses are raised (each with a code of its own)."""

    status = 503

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return retry_after_header(self.retry_after)


class QueueFull(Overloaded):
    code = "GW50300"
    default_message = "Upstream queue is full; retry later."


class QueueTimeout(Overloaded):
    code = "GW50301"
    default_message = "Waited too long for an upstream slot; retry later."


class UpstreamError(GatewayError):
    """Only its subclasses are raised (each with a code of its own)."""

    status = 502
    default_message = "Upstream error."


class UpstreamUnavailable(UpstreamError):
    code = "GW50200"
    default_message = "Upstream unreachable."


class UpstreamBadResponse(UpstreamError):
    code = "GW50201"
    default_message = "Upstream answered with an error."


class UpstreamAuthRejected(UpstreamError):
    code = "GW50202"
    default_message = "Upstream rejected the gateway's credentials; check upstream.ak/sk."


class UpstreamCircuitOpen(UpstreamError):
    status = 503
    code = "GW50302"
    default_message = "Upstream is failing; calls are paused. Retry later."

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return retry_after_header(self.retry_after)


class UpstreamRateLimited(UpstreamError):
    """The upstream answered HTTP 429: never retried; the fleet sends nothing for a while.

    Built with ``after(seconds)``; the plain constructor (a message only, as the Redis
    coalescer rebuilds errors on other replicas) keeps the default ``retry_after``.
    """

    status = 429
    code = "GW42900"
    default_message = "Upstream asked to slow down; retry later."
    retry_after: float = 1.0

    @classmethod
    def after(cls, seconds: float, message: str | None = None) -> Self:
        exc = cls(message)
        exc.retry_after = seconds
        return exc

    def headers(self) -> dict[str, str]:
        return retry_after_header(self.retry_after)


class UpstreamPaused(UpstreamRateLimited):
    """Not sent: the fleet is pausing after an upstream 429 (costs the upstream nothing)."""

    code = "GW42901"
    default_message = "Upstream calls are paused after it asked to slow down; retry later."


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "GW50400"
    default_message = "Upstream timed out."


class BackendUnavailable(GatewayError):
    """A shared backend (Redis) failed or timed out; raised by the Redis implementations only.

    The service decides what it means: the cache treats it as a miss, the limiter falls back.
    """

    status = 503
    code = "GW50310"
    default_message = "A shared backend is unavailable; retry later."

    def headers(self) -> dict[str, str]:
        return retry_after_header(1)


class PermitLost(BackendUnavailable):
    """A granted permit the limiter can no longer vouch for (its epoch was lost, or it was not
    used in time): sending on it could exceed the limit. The attempt takes a fresh permit.
    """

    code = "GW50311"
    default_message = "An upstream permit lapsed before use; retry."


def _classes(root: type[GatewayError]) -> list[type[GatewayError]]:
    found = [root]
    for sub in root.__subclasses__():
        found += _classes(sub)
    return found


# Gateway code -> the class that carries it: the wire format of an error between replicas
# (a class rename must not change what another replica raises).
_BY_CODE: dict[str, type[GatewayError]] = {
    cls.code: cls for cls in _classes(GatewayError) if "code" in vars(cls)
}


def error_class(code: object) -> type[GatewayError] | None:
    """The class whose own gateway code is ``code``, or None."""
    return _BY_CODE.get(code) if isinstance(code, str) else None
