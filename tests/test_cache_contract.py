"""The cache-store contract, run against the in-memory store, the Redis store and the tiered
store Redis mode serves from (``shared_cache``: local copies in front of Redis, subscribed to
invalidations before the test starts, so copies are in play); then what only the Redis store
promises (native TTLs, a campaign index, crafted values as misses, failures as
``BackendUnavailable``) and the pure value format."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import os
import pickle  # only to build a hostile payload: nothing here unpickles
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.cache import CacheStore, InMemoryCacheStore
from gateway.cache_policy import CacheEntry, cache_key
from gateway.cache_redis import (
    MAGIC,
    MAX_BODY_BYTES,
    RedisCacheStore,
    decode_entry,
    encode_entry,
    redis_key,
)
from gateway.cache_tiered import TieredCacheStore, shared_cache
from gateway.clock import Clock, ManualClock, SystemClock
from gateway.errors import BackendUnavailable
from gateway.settings import DEFAULT_NAMESPACE
from gateway.validation import CallResultQuery
from tests.support.processes import free_port
from tests.support.waiting import WITHIN_S, until

BODY = b'{"resultCode":"0200000","resultDesc":"ok","returnCode":"0200000"}'


def key_for(vdn_id: int, campaign_id: int, page: int = 1, locale: str | None = None) -> str:
    return cache_key(CallResultQuery(vdn_id, campaign_id, page_num=page), locale)


def stored(key: str) -> str:
    """Where the Redis store keeps the cache's ``key``."""
    return redis_key(DEFAULT_NAMESPACE, key)


def make_entry(
    clock: Clock,
    *,
    body: bytes = BODY,
    ttl: float = 30.0,
    stale: float = 60.0,
    content_type: str = "application/json;charset=UTF-8",
) -> CacheEntry:
    return CacheEntry(body, content_type, clock.time(), ttl, stale)


@dataclass
class Backend:
    """A store under test, the clock it reads, and for Redis the raw client beside it."""

    store: CacheStore
    clock: Clock
    redis: aioredis.Redis | None

    async def pass_time(self, seconds: float) -> None:
        if isinstance(self.clock, ManualClock):
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)  # Redis expires keys by its own clock: real time


@pytest.fixture
async def tier(redis_client: aioredis.Redis) -> AsyncIterator[TieredCacheStore]:
    """Redis mode's store, subscribed, so that its local copies answer repeated reads."""
    store = shared_cache(redis_client, clock=SystemClock(), local_max_bytes=1 << 20)
    assert isinstance(store, TieredCacheStore)
    await store.get("isales:v1:{0:0}:warm-up")  # starts the listener
    await until(lambda: store.coherent, "the tier is subscribed")
    yield store
    await store.close()


@pytest.fixture(params=["memory", "redis", "tiered"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        clock = ManualClock()
        return Backend(InMemoryCacheStore(max_entries=100, clock=clock), clock, None)
    client: aioredis.Redis = request.getfixturevalue("redis_client")
    system = SystemClock()
    if request.param == "redis":
        return Backend(RedisCacheStore(client, clock=system), system, client)
    return Backend(request.getfixturevalue("tier"), system, client)


@pytest.fixture
def redis_store(redis_client: aioredis.Redis) -> RedisCacheStore:
    return RedisCacheStore(redis_client, clock=SystemClock())


# --- the contract, every store ----------------------------------------------------------------


async def test_get_of_a_key_never_stored_is_none(backend: Backend) -> None:
    assert await backend.store.get(key_for(11, 3)) is None


async def test_put_then_get_returns_the_same_bytes_and_metadata(backend: Backend) -> None:
    entry = make_entry(backend.clock, body=b'{"a":"\xe4\xb8\xad"}\n\x00\xff\r\n', ttl=12.5)
    await backend.store.put(key_for(11, 3), entry)
    assert await backend.store.get(key_for(11, 3)) == entry


async def test_put_again_replaces_the_entry(backend: Backend) -> None:
    await backend.store.put(key_for(11, 3), make_entry(backend.clock, body=b"first"))
    second = make_entry(backend.clock, body=b"second", ttl=5.0, content_type="text/plain")
    await backend.store.put(key_for(11, 3), second)
    assert await backend.store.get(key_for(11, 3)) == second


async def test_an_entry_read_before_it_is_replaced_or_purged_is_not_answered_after(
    backend: Backend,
) -> None:
    """Reads in between, so that a store keeping copies (the tier) holds one when it changes."""
    key, other = key_for(11, 3), key_for(11, 3, page=2)
    first = make_entry(backend.clock, body=b"first")
    await backend.store.put(key, first)
    for _ in range(2):
        assert await backend.store.get(key) == first
    second = make_entry(backend.clock, body=b"second")
    await backend.store.put(key, second)
    assert await backend.store.get(key) == second
    await backend.store.put(other, make_entry(backend.clock))
    assert await backend.store.get(other) is not None
    assert await backend.store.purge_campaign(11, 3) == 2
    assert await backend.store.get(key) is None
    assert await backend.store.get(other) is None


async def test_an_entry_is_kept_through_its_stale_retention_and_not_beyond(
    backend: Backend,
) -> None:
    key = key_for(11, 3)
    await backend.store.put(key, make_entry(backend.clock, ttl=30.0, stale=60.0))
    if isinstance(backend.clock, ManualClock):
        backend.clock.advance(89.9)
        assert await backend.store.get(key) is not None
        backend.clock.advance(0.2)
        assert await backend.store.get(key) is None
    else:
        assert backend.redis is not None
        assert 30_000 < await backend.redis.pttl(stored(key)) <= 90_000


async def test_an_entry_with_a_tiny_lifetime_really_expires(backend: Backend) -> None:
    key = key_for(11, 3)
    await backend.store.put(key, make_entry(backend.clock, ttl=0.02, stale=0.03))
    assert await backend.store.get(key) is not None
    await backend.pass_time(0.06)
    assert await backend.store.get(key) is None


async def test_purge_removes_exactly_one_campaigns_entries_and_counts_them(
    backend: Backend,
) -> None:
    doomed = [key_for(11, 3, page=1), key_for(11, 3, page=2), key_for(11, 3, locale="en_US")]
    # Campaigns whose ids print alike: a prefix match on "11:3" or "1:13" would catch them.
    kept = [key_for(11, 30), key_for(1, 13), key_for(110, 3), key_for(11, 33), key_for(3, 11)]
    for key in doomed + kept:
        await backend.store.put(key, make_entry(backend.clock, body=key.encode()))

    assert await backend.store.purge_campaign(11, 3) == 3

    for key in doomed:
        assert await backend.store.get(key) is None
    for key in kept:
        kept_entry = await backend.store.get(key)
        assert kept_entry is not None
        assert kept_entry.body == key.encode()


async def test_purging_an_unknown_campaign_returns_zero_and_keeps_the_rest(
    backend: Backend,
) -> None:
    await backend.store.put(key_for(11, 3), make_entry(backend.clock))
    assert await backend.store.purge_campaign(99, 7) == 0
    assert await backend.store.get(key_for(11, 3)) is not None


async def test_a_second_purge_finds_nothing_and_later_entries_are_purgeable_again(
    backend: Backend,
) -> None:
    await backend.store.put(key_for(11, 3), make_entry(backend.clock))
    assert await backend.store.purge_campaign(11, 3) == 1
    assert await backend.store.purge_campaign(11, 3) == 0
    await backend.store.put(key_for(11, 3, page=2), make_entry(backend.clock))
    assert await backend.store.get(key_for(11, 3, page=2)) is not None
    assert await backend.store.purge_campaign(11, 3) == 1


# --- Redis only: native expiry and the campaign index ----------------------------------------


def index_of(vdn_id: int, campaign_id: int) -> str:
    return f"isales:v1:{{{vdn_id}:{campaign_id}}}:index"


async def test_a_stored_entry_and_its_campaign_index_carry_a_ttl(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    await redis_store.put(key_for(11, 3), make_entry(SystemClock(), ttl=30.0, stale=60.0))
    entry_pttl = await redis_client.pttl(stored(key_for(11, 3)))
    assert 0 < entry_pttl <= 90_000
    # Read a moment later, and the index's expiry comes from Redis's clock: allow 50 ms.
    assert await redis_client.pttl(index_of(11, 3)) >= entry_pttl - 50


async def test_a_shorter_entry_never_shortens_the_campaign_index_expiry(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    clock = SystemClock()
    await redis_store.put(key_for(11, 3, page=1), make_entry(clock, ttl=1000.0, stale=0.0))
    await redis_store.put(key_for(11, 3, page=2), make_entry(clock, ttl=1.0, stale=0.0))
    assert await redis_client.pttl(index_of(11, 3)) > 990_000
    assert await redis_store.purge_campaign(11, 3) == 2


async def test_expired_entries_leave_the_index_on_the_next_put(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    clock = SystemClock()
    await redis_store.put(key_for(11, 3, page=1), make_entry(clock))  # keeps the index alive
    await redis_store.put(key_for(11, 3, page=2), make_entry(clock, ttl=0.01, stale=0.01))
    expires_ms = await redis_client.zscore(index_of(11, 3), stored(key_for(11, 3, page=2)))
    assert expires_ms is not None

    async def redis_clock_past_it() -> bool:
        seconds, micros = await redis_client.time()
        return seconds * 1000 + micros // 1000 > expires_ms

    await until(redis_clock_past_it, "Redis's clock passed the short entry's expiry")
    await redis_store.put(key_for(11, 3, page=3), make_entry(clock))
    members = await redis_client.zrange(index_of(11, 3), 0, -1)
    assert sorted(members) == sorted(stored(key_for(11, 3, page=p)).encode() for p in (1, 3))


async def test_purge_counts_only_entries_that_still_exist_and_drops_the_index(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    for page in (1, 2, 3):
        await redis_store.put(key_for(11, 3, page=page), make_entry(SystemClock()))
    await redis_client.delete(stored(key_for(11, 3, page=2)))  # as maxmemory eviction would
    assert await redis_store.purge_campaign(11, 3) == 2
    assert await redis_client.exists(index_of(11, 3)) == 0


async def test_an_entry_that_cannot_be_encoded_is_not_stored(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    bad = make_entry(SystemClock(), content_type="text/plain\r\nSet-Cookie: x=1")
    await redis_store.put(key_for(11, 3), bad)
    assert await redis_client.exists(stored(key_for(11, 3))) == 0


async def test_put_refuses_a_key_outside_the_campaign_scheme(redis_store: RedisCacheStore) -> None:
    for key in ("plain", "{}:abc", "isales:v1:{}:abc", "{11:3}:index", index_of(11, 3)):
        with pytest.raises(ValueError, match="campaign cache key"):
            await redis_store.put(key, make_entry(SystemClock()))


def test_a_client_that_decodes_responses_is_refused() -> None:
    client = aioredis.Redis(port=free_port(), decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisCacheStore(client, clock=SystemClock())


# --- Redis only: values someone else wrote are misses ----------------------------------------


class RunsAShellCommand:
    """Unpickling this would run ``touch marker``: the payload an attacker would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


async def test_a_planted_pickle_at_a_cache_key_is_a_miss_and_never_runs(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsAShellCommand(marker), protocol=4)
    assert payload.startswith(b"\x80\x04\x95")
    for value in (payload, MAGIC + payload):
        await redis_client.set(stored(key_for(11, 3)), value, px=60_000)
        assert await redis_store.get(key_for(11, 3)) is None
    assert not marker.exists()


def header(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "stored_at": time.time(),
        "ttl": 30.0,
        "stale": 60.0,
        "content_type": "application/json",
    }
    fields.update(overrides)
    return fields


def value(fields: Any, body: bytes = BODY) -> bytes:
    return MAGIC + json.dumps(fields).encode() + b"\n" + body


@pytest.mark.parametrize(
    "planted",
    [
        b"\x00\xff garbage \xfe",
        value(header(ttl="30")),
        value(header(stale=None)),
        value(header(content_type=["application/json"])),
        value(header(stored_at=time.time() - 1000.0)),  # its retention is over
    ],
    ids=["garbage", "string-ttl", "null-stale", "list-content-type", "past-retention"],
)
async def test_a_planted_value_is_a_miss(
    redis_store: RedisCacheStore, redis_client: aioredis.Redis, planted: bytes
) -> None:
    await redis_client.set(stored(key_for(11, 3)), planted, px=60_000)
    assert await redis_store.get(key_for(11, 3)) is None


# --- Redis only: a failing Redis is BackendUnavailable, at the client's own timeouts ---------


async def assert_every_call_is_backend_unavailable(store: RedisCacheStore) -> None:
    """Each call fails with the client's first error. How soon is the client's timeouts'
    business (a store retrying on its own shows in the connections it opens); ``WITHIN_S``
    only turns a hang into a failure."""
    async with asyncio.timeout(WITHIN_S):
        with pytest.raises(BackendUnavailable):
            await store.get(key_for(11, 3))
        with pytest.raises(BackendUnavailable):
            await store.put(key_for(11, 3), make_entry(SystemClock()))
        with pytest.raises(BackendUnavailable):
            await store.purge_campaign(11, 3)


async def test_an_unreachable_redis_raises_backend_unavailable_quickly() -> None:
    client = aioredis.Redis(
        port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 1)
    )
    try:
        await assert_every_call_is_backend_unavailable(RedisCacheStore(client, clock=SystemClock()))
    finally:
        await client.aclose()


async def test_a_redis_that_never_answers_raises_backend_unavailable_at_the_socket_timeout() -> (
    None
):
    writers: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(
        port=port, socket_connect_timeout=0.2, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        await assert_every_call_is_backend_unavailable(RedisCacheStore(client, clock=SystemClock()))
        assert len(writers) <= 3  # one connection per call: no retry the client was not told of
    finally:
        await client.aclose()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


# --- the value format, pure ------------------------------------------------------------------


def test_an_encoded_entry_is_the_header_then_the_raw_body_and_decodes_to_itself() -> None:
    entry = CacheEntry(b"\x00\xff\n raw", "application/json", 1_700_000_000.123456, 30.0, 0.0)
    raw = encode_entry(entry)
    assert raw.startswith(MAGIC)
    assert raw.endswith(b"\n\x00\xff\n raw")
    assert decode_entry(raw) == entry


def test_the_request_that_stored_an_entry_round_trips_with_it() -> None:
    entry = CacheEntry(BODY, "application/json", 1_700_000_000.0, 30.0, 0.0, request_id="r-1:a")
    assert decode_entry(encode_entry(entry)) == entry
    packed = CacheEntry(large_body(), "application/json", 1_700_000_000.0, 30.0, 0.0)
    packed = dataclasses.replace(packed, request_id="r-2")
    decoded = decode_entry(encode_entry(packed))
    assert decoded is not None
    assert (decoded.body, decoded.request_id) == (packed.body, "r-2")


def test_an_empty_body_round_trips() -> None:
    entry = CacheEntry(b"", "application/json", 1_700_000_000.0, 1.0, 1.0)
    assert decode_entry(encode_entry(entry)) == entry


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x80\x04\x95\x00\x00", id="pickle-opcodes"),
        pytest.param(value(header()).replace(b"ISGW1", b"ISGW2", 1), id="wrong-magic"),
        pytest.param(MAGIC + json.dumps(header()).encode(), id="no-header-end"),
        pytest.param(MAGIC + b" " * 1100 + json.dumps(header()).encode() + b"\n", id="long-header"),
        pytest.param(MAGIC + b"{not json}\n" + BODY, id="not-json"),
        pytest.param(MAGIC + b'{"\xff":1}\n' + BODY, id="not-utf8"),
        pytest.param(value([1, 2, 3]), id="header-a-list"),
        pytest.param(value({k: v for k, v in header().items() if k != "ttl"}), id="missing-ttl"),
        pytest.param(value(header(extra=1)), id="extra-field"),
        pytest.param(value(header(stored_at="1700000000")), id="string-stored-at"),
        pytest.param(value(header(ttl=True)), id="bool-ttl"),
        pytest.param(value(header(ttl=-1.0)), id="negative-ttl"),
        pytest.param(value(header(stale=-0.5)), id="negative-stale"),
        pytest.param(value(header(stored_at=-5)), id="negative-stored-at"),
        pytest.param(value(header(ttl=1e12)), id="absurd-ttl"),
        pytest.param(value(header(stored_at=1e15)), id="absurd-stored-at"),
        pytest.param(MAGIC + b'{"stored_at":1,"ttl":NaN,"stale":1,"content_type":"a"}\n', id="nan"),
        pytest.param(value(header(stale=float("inf"))), id="infinite-stale"),
        pytest.param(value(header(content_type=7)), id="number-content-type"),
        pytest.param(value(header(content_type="")), id="empty-content-type"),
        pytest.param(value(header(content_type="a\r\nSet-Cookie: x")), id="crlf-content-type"),
        pytest.param(value(header(content_type="x" * 300)), id="long-content-type"),
        pytest.param(value(header(request_id=7)), id="number-request-id"),
        pytest.param(value(header(request_id="a\nb")), id="newline-request-id"),
        pytest.param(value(header(request_id="r" * 129)), id="long-request-id"),
        pytest.param(value(header(), b"x" * (MAX_BODY_BYTES + 1)), id="absurd-body"),
        pytest.param(value(header(encoding="br"), gzip.compress(BODY)), id="unknown-encoding"),
        pytest.param(value(header(encoding="gzip"), BODY), id="not-gzip"),
        pytest.param(value(header(encoding="gzip"), gzip.compress(BODY)[:-3]), id="cut-gzip"),
        pytest.param(
            value(header(encoding="gzip"), gzip.compress(BODY) + b"tail"), id="gzip-then-junk"
        ),
        pytest.param(
            value(header(encoding="gzip"), gzip.compress(bytes(MAX_BODY_BYTES + 1), 1)),
            id="gzip-bomb",
        ),
    ],
)
def test_decode_rejects_anything_encode_would_not_write(raw: bytes) -> None:
    assert decode_entry(raw) is None


@pytest.mark.parametrize(
    "entry",
    [
        CacheEntry(BODY, "application/json", 1_700_000_000.0, -1.0, 0.0),
        CacheEntry(BODY, "application/json", 1_700_000_000.0, float("nan"), 0.0),
        CacheEntry(BODY, "application/json\n", 1_700_000_000.0, 1.0, 0.0),
    ],
    ids=["negative-ttl", "nan-ttl", "newline-content-type"],
)
def test_encode_refuses_an_entry_decode_would_reject(entry: CacheEntry) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's and ours both say ValueError
        encode_entry(entry)


# --- compressed entries --------------------------------------------------------------------


def large_body(rows: int = 500) -> bytes:
    """A vendor-shaped answer of ``rows`` rows: large, and as repetitive as real ones."""
    row = '{"subscriberId":"%d","callResult":"%d","callTime":"2026-11-%02d 10:%02d:00"}'
    text = ",".join(row % (13_800_000_000 + i, i % 7, 1 + i % 28, i % 60) for i in range(rows))
    return b'{"resultCode":"0200000","resultDesc":"ok","data":[' + text.encode() + b"]}"


async def test_a_large_answer_is_kept_compressed_and_read_back_byte_for_byte(
    backend: Backend,
) -> None:
    body = large_body()
    entry = make_entry(backend.clock, body=body)
    await backend.store.put(key_for(11, 3), entry)
    got = await backend.store.get(key_for(11, 3))
    assert got is not None
    assert got.body == body
    assert got.gzip is not None
    assert gzip.decompress(got.gzip) == body
    assert (got.content_type, got.stored_at, got.ttl, got.stale) == (
        entry.content_type,
        entry.stored_at,
        entry.ttl,
        entry.stale,
    )
    if backend.redis is not None:
        size = await backend.redis.strlen(stored(key_for(11, 3)))
        assert 0 < size <= 0.3 * len(body), (size, len(body))


async def test_a_small_or_incompressible_answer_is_kept_as_it_is(backend: Backend) -> None:
    for n, body in enumerate((BODY, os.urandom(8192))):
        await backend.store.put(key_for(11, 3, page=n + 1), make_entry(backend.clock, body=body))
        got = await backend.store.get(key_for(11, 3, page=n + 1))
        assert got is not None
        assert (got.body, got.gzip) == (body, None)


def test_a_compressed_value_is_the_header_with_its_encoding_then_the_gzip_member() -> None:
    entry = CacheEntry(large_body(), "application/json", 1_700_000_000.0, 30.0, 0.0)
    raw = encode_entry(entry)
    head, _, packed = raw[len(MAGIC) :].partition(b"\n")
    assert json.loads(head)["encoding"] == "gzip"
    assert gzip.decompress(packed) == entry.body
    decoded = decode_entry(raw)
    assert decoded is not None
    assert decoded.body == entry.body
    assert decoded.gzip == packed
