"""Who may call, and which vdnIds they may read.

Callers present an API key (``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; a
vendor-style ``auth-v2/...`` Authorization header from a drop-in client is ignored). The
configuration holds only SHA-256 digests of keys, each with a caller name and the vdnIds it
may query (``*`` for all); digests are compared in constant time. Pure: no aiohttp, no I/O
beyond reading the callers file in ``load_callers``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError, Forbidden, Unauthenticated
from gateway.vendor import MAX_VDN_ID, MIN_VDN_ID

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def presented_key(api_key: str | None, authorization: str | None) -> str | None:
    return api_key or bearer(authorization)


def _matches(key: str, digest: str) -> bool:
    return bool(digest) and hmac.compare_digest(key_digest(key), digest)


def require_admin(key: str | None, admin_sha256: str) -> None:
    """Raise unless ``key`` is the admin key; with no admin key set, nobody is admin."""
    if key is None:
        raise Unauthenticated()
    if not _matches(key, admin_sha256):
        raise Forbidden("Admin key required.")


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    key_sha256: str
    vdn_ids: frozenset[int] | None  # None: every vdnId
    # Its share of the upstream budget (gateway/limiter/scheduler.py): relative weight, and optional
    # caps on permits held at once and on requests waiting (None: the limit.max_queue bound).
    weight: float = 1.0
    max_in_flight: int | None = None
    max_queue: int | None = None

    def may_read(self, vdn_id: int) -> bool:
        return self.vdn_ids is None or vdn_id in self.vdn_ids


@dataclass(frozen=True, slots=True)
class Callers:
    callers: tuple[Caller, ...]

    def authenticate(self, key: str | None) -> Caller:
        """The caller owning ``key``; every digest is compared, so timing tells nothing."""
        if key is None:
            raise Unauthenticated()
        found = None
        for caller in self.callers:
            if _matches(key, caller.key_sha256):
                found = caller
        if found is None:
            raise Unauthenticated()
        return found

    @staticmethod
    def authorize(caller: Caller, vdn_id: int) -> None:
        if not caller.may_read(vdn_id):
            raise Forbidden(f"Caller {caller.name} may not query vdnId {vdn_id}.")


_REQUIRED = frozenset({"name", "key_sha256", "vdn_ids"})
_SHARE = frozenset({"weight", "max_in_flight", "max_queue"})


def parse_callers(data: dict[str, object], source: str = "auth.callers_file") -> Callers:
    """Callers from ``[[callers]]`` tables: ``name``, ``key_sha256``, ``vdn_ids``, and
    optionally ``weight`` (default 1), ``max_in_flight`` and ``max_queue``."""
    entries = data.get("callers")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(source, "needs at least one [[callers]] table")
    callers = []
    for n, entry in enumerate(entries):
        where = f"{source}: callers[{n}]"
        if not isinstance(entry, dict) or not _REQUIRED <= set(entry) <= _REQUIRED | _SHARE:
            raise ConfigError(
                where,
                "needs name, key_sha256 and vdn_ids, and may have weight, max_in_flight "
                "and max_queue",
            )
        name, digest, vdn_ids = entry["name"], entry["key_sha256"], entry["vdn_ids"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(where, "name must be 1-64 of A-Z a-z 0-9 . _ -")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ConfigError(where, "key_sha256 must be 64 lowercase hex digits")
        weight, max_in_flight, max_queue = _share(entry, where)
        callers.append(
            Caller(name, digest, _vdn_ids(vdn_ids, where), weight, max_in_flight, max_queue)
        )
    digests = [c.key_sha256 for c in callers]
    if len(set(digests)) != len(digests):
        raise ConfigError(source, "two callers share one key")
    return Callers(tuple(callers))


def _vdn_ids(value: object, where: str) -> frozenset[int] | None:
    if value == ["*"]:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(type(v) is int and MIN_VDN_ID <= v <= MAX_VDN_ID for v in value)
    ):
        raise ConfigError(
            where, f'vdn_ids must be ["*"] or a list of integers {MIN_VDN_ID}-{MAX_VDN_ID}'
        )
    return frozenset(value)


def _share(entry: dict[str, object], where: str) -> tuple[float, int | None, int | None]:
    """The optional share fields of one caller, checked: weight, max_in_flight, max_queue."""
    weight = entry.get("weight", 1)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise ConfigError(where, "weight must be a number from 0.01 to 1000")
    if not 0.01 <= weight <= 1000:
        raise ConfigError(where, "weight must be a number from 0.01 to 1000")
    caps: list[int | None] = []
    for name, low in (("max_in_flight", 1), ("max_queue", 0)):
        value = entry.get(name)
        if value is not None and (type(value) is not int or not low <= value <= 100000):
            raise ConfigError(where, f"{name} must be an integer from {low} to 100000")
        caps.append(value if isinstance(value, int) else None)
    return float(weight), caps[0], caps[1]


def load_callers(path: str) -> Callers:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("auth.callers_file", f"cannot read {path}: {exc}") from exc
    return parse_callers(data)


@dataclass(frozen=True, slots=True)
class AccessKeys:
    """The keys in force: the callers (None: caller authentication off) and the admin digest."""

    callers: Callers | None
    admin_sha256: str = ""


class KeyRing:
    """Holds the ``AccessKeys`` in force; a reload swaps the whole set at once, so a request
    sees either the old keys or the new ones, never a mix."""

    def __init__(self, keys: AccessKeys) -> None:
        self.current = keys

    def replace(self, keys: AccessKeys) -> None:
        self.current = keys
