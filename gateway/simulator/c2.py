"""The C2 ``auth-v2`` request signature, checked as the vendor's server would check it.

Written from the vendor's description (``shared/upstream/c2-signing.md``) on its own: the
simulator shares no code with the gateway's signer, so a mistake there shows here as a 401
instead of being agreed with. Pure: the time and the secrets are inputs.

The server re-reads everything from the header: ``auth-v2/{AK}/{timestamp}/{signedHeaders}/
{signature}``. It insists that ``host`` is signed (the vendor's demo signs ``host`` only;
other pages sign more headers, never fewer), that the timestamp is fresh, and that every
signed header was sent with the value signed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_STAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{3}))?Z")


def percent(data: bytes) -> str:
    """Every byte but ``A-Z a-z 0-9 - . _ ~`` as ``%XX`` (upper-case hex)."""
    return "".join(chr(b) if b in _KEEP else "%" + format(b, "02X") for b in data)


def _utf8(text: str) -> bytes:
    # Header bytes that were not UTF-8 come decoded with surrogate escapes: sign the bytes.
    return text.encode("utf-8", "surrogateescape")


def hmac_sha256_hex(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def stamp_seconds(text: str) -> float | None:
    """Epoch seconds of ``yyyy-MM-ddTHH:mm:ss[.SSS]Z``, or None if it is not one."""
    found = _STAMP.fullmatch(text)
    if found is None:
        return None
    year, month, day, hour, minute, second, millis = found.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError:
        return None
    return moment.timestamp() + int(millis or "0") / 1000


def string_to_sign(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    signed: str,
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    """The canonical request: method, path, [query], signed header names, headers, body."""
    lines = [method.upper(), path]
    pairs = sorted(f"{percent(_utf8(k))}={percent(_utf8(v))}" for k, v in query)
    if pairs:  # no query: no line at all, not an empty one
        lines.append("&".join(pairs))
    lines.append(signed)
    names = sorted(signed.split(";"))
    lines.append("\n".join(f"{percent(_utf8(n))}:{percent(_utf8(headers[n]))}" for n in names))
    return "\n".join(lines) + "\n" + (percent(body) if body else "")


def check(
    authorization: str | None,
    *,
    secrets: Mapping[str, str],
    now: float,
    max_skew_s: float,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
) -> str | None:
    """None if ``authorization`` is a valid signature of this request, else why not.

    ``secrets`` maps AK to SK; ``headers`` maps lower-case names to the values received.
    """
    if not authorization:
        return "missing Authorization"
    parts = authorization.split("/")
    if len(parts) != 5 or parts[0] != "auth-v2" or not all(parts[1:]):
        return "malformed Authorization header"
    _, ak, stamp, signed, signature = parts
    issued = stamp_seconds(stamp)
    if issued is None:
        return "malformed timestamp"
    sk = secrets.get(ak)
    if sk is None:
        return "unknown AK"
    if abs(now - issued) > max_skew_s:
        return "stale timestamp"
    names = signed.split(";")
    if "host" not in names:
        return "host is not a signed header"
    if any(name not in headers for name in names):
        return "a signed header is missing"
    signing_key = hmac_sha256_hex(sk, f"auth-v2/{ak}/{stamp}/{signed}")
    text = string_to_sign(method, path, query, signed, headers, body)
    expected = hmac_sha256_hex(signing_key, text)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "signature mismatch"
    return None
