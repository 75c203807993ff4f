"""The cross-replica coalescer's names and wire format (``coalesce_redis``); pure, no I/O.

Keys: every key and channel starts with the namespace, and a round's keys share one Redis
Cluster hash tag (the question's key itself, unless it carries a tag), so each script's keys
sit in one slot. A lock's value names the leader's replica and the round
(``<replica>.<token>``); each replica's liveness is one membership key.

Outcome format (never pickle): a JSON header line, ``\\n``, the upstream's raw body. A value
that does not decode is ignored. A ``GatewayError`` from the leader's ``fetch`` travels as its
gateway code (a class name would make a rename change behaviour in a rolling deploy) and is
re-raised on followers as the same class (unknown: ``UpstreamBadResponse``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway import errors
from gateway.errors import GatewayError, Overloaded
from gateway.settings import DEFAULT_NAMESPACE
from gateway.upstream import UpstreamResponse

RELEASED = b'{"v":1,"released":true}\n'  # not an outcome: "the lock is free, try it now"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one round produced: a response or the exception ``fetch`` raised."""

    response: UpstreamResponse | None = None
    error: Exception | None = None

    def unwrap(self) -> UpstreamResponse:
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def tagged(key: str) -> str:
    """``key`` itself if it has a Redis Cluster hash tag, else the whole key as the tag."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key if start >= 0 and end > start + 1 else "{" + key + "}"


def round_key(key: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """What the lock and the outcomes of ``key``'s rounds are named after."""
    return f"{namespace}:{tagged(key)}"


def lock_key(key: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return round_key(key, namespace) + ":lock"


def member_key(replica: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The key that says ``replica``'s coalescer is alive (renewed every lease/3)."""
    return f"{namespace}:coalesce:replica:{replica}"


def holder_replica(value: bytes) -> str | None:
    """The replica a lock's value names, or None for a value without one (a replica of before
    membership keys: its lock lives by its own renewals)."""
    replica, dot, token = value.partition(b".")
    if not (dot and 0 < len(replica) <= 64 and token and replica.isalnum()):
        return None
    return replica.decode("ascii")


def outcome_channel(namespace: str = DEFAULT_NAMESPACE) -> str:
    """The one channel of a namespace's outcomes (sharded pub/sub has no patterns)."""
    return f"{namespace}:coalesce"


def outcome_message(key: str, data: bytes) -> bytes:
    """What is published for ``key``'s round: its hash-tagged key, a newline, ``data``."""
    return tagged(key).encode() + b"\n" + data


def encode_outcome(outcome: Outcome) -> bytes:
    """The published/stored form: JSON header line + raw body (errors: gateway code + message)."""
    if outcome.response is not None:
        r = outcome.response
        header: dict[str, object] = {"v": 1, "status": r.status, "content_type": r.content_type}
        if r.request_id is not None:
            header["request_id"] = r.request_id  # followers' access lines name the leader
        return json.dumps(header).encode() + b"\n" + r.body
    exc = outcome.error
    if isinstance(exc, GatewayError):
        # By code: a class name would make a rename change behaviour in a rolling deploy.
        header = {"v": 1, "code": exc.code, "error": type(exc).__name__, "message": exc.message}
        if isinstance(exc, Overloaded):
            header["retry_after"] = exc.retry_after
    else:  # a bug in fetch: its text stays in this replica's log
        header = {"v": 1, "code": errors.UpstreamBadResponse.code, "message": None}
    return json.dumps(header).encode() + b"\n"


def decode_outcome(data: object) -> Outcome | None:
    """The outcome ``data`` encodes, or None when it is malformed (never raises)."""
    if not isinstance(data, bytes):
        return None
    line, sep, body = data.partition(b"\n")
    try:
        header = json.loads(line) if sep and len(line) <= 4096 else None
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("v") != 1:
        return None
    status, ctype = header.get("status"), header.get("content_type")
    if type(status) is int and 100 <= status <= 599 and isinstance(ctype, str):
        leader = header.get("request_id")
        leader = leader if isinstance(leader, str) and len(leader) <= 128 else None
        return Outcome(response=UpstreamResponse(status, body, ctype, request_id=leader))
    code, name, message = header.get("code"), header.get("error"), header.get("message")
    if not (isinstance(code, str) or isinstance(name, str)):
        return None
    if not (message is None or isinstance(message, str)):
        return None
    cls = errors.error_class(code)
    if cls is None and isinstance(name, str):  # from a replica of before the codes
        named = getattr(errors, name, None)
        cls = named if isinstance(named, type) and issubclass(named, GatewayError) else None
    if cls is None:
        cls = errors.UpstreamBadResponse
    if issubclass(cls, Overloaded):
        retry = header.get("retry_after")
        if isinstance(retry, bool) or not isinstance(retry, int | float) or not 0 <= retry < 1e6:
            retry = 1.0
        return Outcome(error=cls(float(retry), message))
    if cls.__init__ is not GatewayError.__init__:  # e.g. ParameterError: not an upstream outcome
        cls = errors.UpstreamBadResponse
    return Outcome(error=cls(message))
