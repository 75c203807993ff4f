"""Who may call: keys are compared by their SHA-256, in constant time; the config never holds a key.

Pure: no aiohttp, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import Forbidden, Unauthenticated


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def require_admin(authorization: str | None, admin_sha256: str) -> None:
    """Raise unless the header carries the admin key; with no admin key set, nobody is admin."""
    token = bearer(authorization)
    if token is None:
        raise Unauthenticated()
    if not admin_sha256 or not hmac.compare_digest(key_digest(token), admin_sha256):
        raise Forbidden("Admin key required.")
