"""The call to the vendor: sign afresh, send exactly the signed bytes, translate failures.

aiohttp errors become ``UpstreamError`` subclasses here and nowhere else. A business answer
(HTTP 200, any ``resultCode``) passes through unchanged; HTTP 401 means the gateway's AK/SK
were refused; any other status is a broken upstream.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiohttp

from gateway.clock import Clock
from gateway.errors import (
    UpstreamAuthRejected,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.settings import UpstreamSettings
from gateway.signing import authorization, format_timestamp
from gateway.validation import CallResultQuery

REQUEST_CONTENT_TYPE = "application/json; charset=UTF-8"


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    # Set when the answer came from a cache entry another call had just stored: its age.
    cached_age: int | None = None


def ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    """TLS verification on by default, with an optional private CA bundle."""
    if not settings.verify_tls:
        return False
    return ssl.create_default_context(cafile=settings.ca_file or None)


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
        self._base = settings.url.rstrip("/")
        self._host = host
        self._session = session
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
            headers["locale"] = locale
        return headers

    async def fetch(self, query: CallResultQuery, locale: str | None = None) -> UpstreamResponse:
        body = query.body_bytes()
        headers = self.signed_headers(query.path, body, locale or self._settings.locale or None)
        try:
            async with self._session.post(
                self._base + query.path,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "application/json")
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise UpstreamUnavailable() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBadResponse() from exc
        if status == 401:
            raise UpstreamAuthRejected()
        if status != 200:
            raise UpstreamBadResponse(f"Upstream answered HTTP {status}.")
        return UpstreamResponse(status, payload, content_type)
