"""The vendor's C2 AK/SK request signature (``auth-v2``), as in ``shared/upstream/c2-signing.md``.

Pure functions: the timestamp and the secret are inputs. The gateway signs every upstream
attempt afresh with ``authorization``; the simulator checks with ``verify``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

TimestampFormat = Literal["seconds", "milliseconds"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ENCODE = tuple(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in range(256))
_TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3})?Z$")


def normalize(value: str | bytes) -> str:
    """Percent-encode every byte but ``A-Z a-z 0-9 - . _ ~`` (uppercase hex)."""
    data = value.encode() if isinstance(value, str) else value
    return "".join(_ENCODE[b] for b in data)


def hmac_hex(key: str, msg: str) -> str:
    return hmac.new(key.encode(), msg.encode(), hashlib.sha256).hexdigest()


def format_timestamp(epoch: float, fmt: TimestampFormat = "seconds") -> str:
    """UTC ``yyyy-MM-ddTHH:mm:ssZ`` (or with ``.SSS`` milliseconds)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    if fmt == "milliseconds":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> float:
    """Epoch seconds of a C2 timestamp; ``ValueError`` if it is not one."""
    if not _TIMESTAMP_RE.match(text):
        raise ValueError(f"not a C2 timestamp: {text!r}")
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in text else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()


def canonical_request(
    method: str,
    path: str,
    query: Mapping[str, str],
    signed_headers: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    """The text that is signed. ``headers`` maps lowercase names to the values sent."""
    names = sorted(h.lower() for h in signed_headers)
    lines = [method.upper(), path]
    if query:
        lines.append("&".join(sorted(f"{normalize(k)}={normalize(v)}" for k, v in query.items())))
    lines.append(";".join(names))
    lines.append("\n".join(sorted(f"{normalize(n)}:{normalize(headers[n])}" for n in names)))
    return "\n".join(lines) + "\n" + (normalize(body) if body else "")


def authorization(
    *,
    ak: str,
    sk: str,
    timestamp: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    signed_headers: Sequence[str] = ("host",),
    query: Mapping[str, str] | None = None,
) -> str:
    """The ``Authorization`` header value; ``headers`` must hold every signed header (lowercase)."""
    names = ";".join(sorted(h.lower() for h in signed_headers))
    prefix = f"auth-v2/{ak}/{timestamp}/{names}"
    signing_key = hmac_hex(sk, prefix)
    canonical = canonical_request(method, path, query or {}, signed_headers, headers, body)
    return f"{prefix}/{hmac_hex(signing_key, canonical)}"


@dataclass(frozen=True, slots=True)
class ParsedAuthorization:
    ak: str
    timestamp: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization:
    """Split an ``auth-v2`` header; ``ValueError`` if malformed."""
    parts = value.split("/")
    if len(parts) != 5 or parts[0] != "auth-v2" or not all(parts[1:]):
        raise ValueError("malformed Authorization header")
    _, ak, timestamp, names, signature = parts
    return ParsedAuthorization(ak, timestamp, tuple(names.split(";")), signature)


def verify(
    value: str | None,
    *,
    credentials: Mapping[str, str],
    now: float,
    max_skew: float,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    query: Mapping[str, str] | None = None,
) -> str | None:
    """Check an ``Authorization`` value server-side; ``None`` if valid, else why not.

    ``credentials`` maps AK to SK; ``headers`` maps lowercase names to received values.
    """
    if not value:
        return "missing Authorization"
    try:
        parsed = parse_authorization(value)
        issued = parse_timestamp(parsed.timestamp)
    except ValueError as exc:
        return str(exc)
    sk = credentials.get(parsed.ak)
    if sk is None:
        return "unknown AK"
    if abs(now - issued) > max_skew:
        return "stale timestamp"
    if any(name not in headers for name in parsed.signed_headers):
        return "a signed header is missing"
    expected = authorization(
        ak=parsed.ak,
        sk=sk,
        timestamp=parsed.timestamp,
        method=method,
        path=path,
        headers=headers,
        body=body,
        signed_headers=parsed.signed_headers,
        query=query,
    )
    if not hmac.compare_digest(expected.encode(), value.encode()):
        return "signature mismatch"
    return None
