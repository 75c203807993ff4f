"""The call to the vendor: sign afresh, send exactly the signed bytes, translate failures.

The vendor counts a request's start on arrival, so the permit learns the moment its bytes go
out (aiohttp's ``on_request_chunk_sent`` trace for the body's first chunk, given to the session
by ``send_trace()``), not when it was granted: connection set-up, a TLS handshake or a stalled
event loop in between cannot bunch starts up at the vendor. aiohttp fires it in the loop step
that writes the headers and that chunk to the transport, just before the write. Not
``on_request_headers_sent``: aiohttp 3.14 fires that as it buffers the headers, and on Python
3.11 the task that writes them with the body runs on a later loop pass, under load up to
112 ms later (measured), more than the window's margin.

aiohttp errors become ``UpstreamError`` subclasses here and nowhere else. What an answer
means (``classify``): HTTP 200 with the vendor's JSON (any ``resultCode``) passes through
unchanged; a 200 that is not the vendor's (a proxy's login page) is a broken upstream; 401
means the gateway's AK/SK were refused; 429 asks the fleet to pause (``Retry-After``); any
other 4xx is the vendor's verdict on the request and passes through unchanged (status and
body); anything else (5xx, a redirect) is a broken upstream.

The path signed is the path sent: an upstream URL with a path prefix
(``https://host/prefix``) sends and signs ``/prefix/rest/...``.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace

import aiohttp
from yarl import URL

from gateway import otel
from gateway.cache_policy import business_code
from gateway.clock import Clock
from gateway.errors import (
    UpstreamAuthRejected,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pause import pause_seconds
from gateway.request_trace import current as current_trace
from gateway.settings import UpstreamSettings
from gateway.signing import authorization, format_timestamp
from gateway.validation import CallResultQuery
from gateway.vendor import LOCALE_HEADER, REQUEST_CONTENT_TYPE

OnSent = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    # Set when the answer came from a cache entry another call had just stored: its age.
    cached_age: int | None = None
    # The vendor's resultCode, set by ``classify`` on a 200 (None: a passed-through 4xx).
    code: str | None = None
    # The X-Request-ID of the request that made this call (in-process coalescing names it).
    request_id: str | None = None


def classify(status: int, body: bytes, content_type: str, retry_after: float) -> UpstreamResponse:
    """The answer to pass on, or the ``UpstreamError`` it means (see the module docstring).

    ``retry_after``: the pause a 429 asks for, in seconds (already defaulted and capped).
    """
    if status == 200:
        code = business_code(status, body)
        if code is None:
            raise UpstreamBadResponse(
                "Upstream answered HTTP 200 with a body that is not the vendor's."
            )
        return UpstreamResponse(status, body, content_type, code=code)
    if status == 401:
        raise UpstreamAuthRejected()
    if status == 429:
        raise UpstreamRateLimited.after(retry_after)
    if 400 <= status < 500:
        return UpstreamResponse(status, body, content_type)
    raise UpstreamBadResponse(f"Upstream answered HTTP {status}.")


def ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    """TLS verification on by default, with an optional private CA bundle."""
    if not settings.verify_tls:
        return False
    return ssl.create_default_context(cafile=settings.ca_file or None)


@dataclass(slots=True)
class _SendHook:
    """The ``trace_request_ctx`` of one fetch: what to await as its bytes go out, and what to
    call once its connection is ready, before they are written (``ready`` may raise to stop
    the request there: e.g. a permit that lapsed while the process was frozen).
    """

    on_sent: OnSent
    ready: Callable[[], None] | None = None
    fired: bool = False  # on_sent ran (a body in several chunks sends it once)

    async def sent(self) -> None:
        if not self.fired:
            self.fired = True
            await self.on_sent()


class SendTrace(aiohttp.TraceConfig):
    """Awaits a fetch's ``on_sent`` as its request's bytes are written to the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.on_request_chunk_sent.append(self._chunk_sent)
        self.on_connection_create_end.append(self._connection_ready)
        self.on_connection_reuseconn.append(self._connection_ready)

    @staticmethod
    async def _connection_ready(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: object
    ) -> None:
        hook = context.trace_request_ctx
        if isinstance(hook, _SendHook) and hook.ready is not None:
            hook.ready()

    @staticmethod
    async def _chunk_sent(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestChunkSentParams,
    ) -> None:
        hook = context.trace_request_ctx
        if isinstance(hook, _SendHook):
            await hook.sent()


def send_trace() -> SendTrace:
    """The trace to give the session of ``UpstreamClient`` (``trace_configs=[send_trace()]``)."""
    return SendTrace()


class UpstreamClient:
    """Sends one signed callresult query per ``fetch``; the caller holds the permit."""

    def __init__(
        self,
        settings: UpstreamSettings,
        host: str,
        session: aiohttp.ClientSession,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._base = settings.url.rstrip("/")  # may carry a path prefix: sent and signed
        self._host = host
        self._session = session
        # Without the trace, ``on_sent`` is called just before the request (never earlier
        # than the grant, so no less exact than counting at the grant).
        self._traced = any(isinstance(t, SendTrace) for t in session.trace_configs)
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_ms / 1000, sock_connect=settings.connect_timeout_ms / 1000
        )

    def signed_headers(self, path: str, body: bytes, locale: str | None) -> dict[str, str]:
        """The headers of one attempt, signed now (never reused: the skew allowed is unknown)."""
        headers = {
            "host": self._host,
            "content-type": REQUEST_CONTENT_TYPE,
            "content-length": str(len(body)),
        }
        headers["authorization"] = authorization(
            ak=self._settings.ak,
            sk=self._settings.sk,
            timestamp=format_timestamp(self._clock.time(), self._settings.timestamp_format),
            method="POST",
            path=path,
            headers=headers,
            body=body,
            signed_headers=self._settings.signed_headers,
        )
        if locale:
            headers[LOCALE_HEADER] = locale
        return headers

    @staticmethod
    def trace_headers() -> tuple[dict[str, str], str | None]:
        """``X-Request-ID`` and ``traceparent`` of the request this call runs for (unsigned:
        the vendor ignores them; they let its logs and a tracer follow the request)."""
        trace = current_trace.get()
        if trace is None:
            return {}, None
        headers = {}
        if trace.request_id:
            headers["X-Request-ID"] = trace.request_id
        if trace.traceparent:
            headers["traceparent"] = trace.traceparent
        return headers, trace.request_id

    async def fetch(
        self,
        query: CallResultQuery,
        locale: str | None = None,
        on_sent: OnSent | None = None,
        ready: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """The vendor's answer, sent with ``locale`` if given (the caller resolves the setting);
        ``on_sent`` is awaited as the request's bytes go out, so only if the request got that
        far (a redirect is never followed: at most once). ``ready`` is called once the
        connection is ready, just before the headers are written; what it raises stops the
        request unsent.
        """
        body = query.body_bytes()
        url = URL(self._base + query.path)
        headers = self.signed_headers(url.raw_path, body, locale)
        extra, request_id = self.trace_headers()
        headers.update(extra)
        with contextlib.ExitStack() as stack:
            spans = otel.active.get()
            if spans is not None:  # the upstream call's span becomes the traceparent's parent
                trace = current_trace.get()
                waited = None if trace is None else trace.queue_wait_ms
                headers.update(stack.enter_context(spans.upstream_call(waited)))
                if trace is not None:
                    trace.traceparent = headers.get("traceparent", trace.traceparent)
            return await self._send(url, body, headers, on_sent, ready, request_id)

    async def _send(
        self,
        url: URL,
        body: bytes,
        headers: dict[str, str],
        on_sent: OnSent | None,
        ready: Callable[[], None] | None,
        request_id: str | None,
    ) -> UpstreamResponse:
        hook = None if on_sent is None else _SendHook(on_sent, ready)
        if hook is not None and not self._traced:
            if ready is not None:
                ready()
            await hook.sent()
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                trace_request_ctx=hook,
                proxy=self._settings.proxy or None,
            ) as response:
                payload = await _read_at_most(response, self._settings.max_body_bytes)
                status = response.status
                content_type = response.headers.get("Content-Type", "application/json")
                retry_after = response.headers.get("Retry-After")
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise UpstreamUnavailable() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBadResponse() from exc
        pause = 0.0
        if status == 429:
            pause = pause_seconds(
                retry_after,
                self._clock.time(),
                default_s=self._settings.pause_ms / 1000,
                max_s=self._settings.pause_max_ms / 1000,
            )
        return replace(classify(status, payload, content_type, pause), request_id=request_id)


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body (decompressed), or ``UpstreamBadResponse`` once it passes ``limit``
    bytes: memory stays bounded whatever the upstream sends, and such an answer is never
    cached or passed on.
    """
    length = response.content_length
    if length is not None and length > limit:
        raise UpstreamBadResponse(f"Upstream answer of {length} bytes is over max_body_bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise UpstreamBadResponse("Upstream answer is over upstream.max_body_bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
