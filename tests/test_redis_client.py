"""The Redis client the app builds: short budgets, and the URL forms it accepts."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway.errors import ConfigError
from gateway.redis_client import check_eviction_policy, connect
from gateway.settings import RedisSettings
from tests.support.processes import RedisServer, free_port


async def test_a_plain_url_gets_a_blocking_pool_with_the_configured_budget(
    redis_server: RedisServer,
) -> None:
    settings = RedisSettings(url=redis_server.url, timeout_ms=300, pool_size=7, pool_timeout_ms=900)
    client = connect(settings)
    try:
        pool = client.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == 7
        assert pool.timeout == 0.9  # the wait for a free connection: a budget of its own
        assert pool.connection_kwargs["socket_timeout"] == 0.3
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.3
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_sentinel_url_builds_a_sentinel_managed_client_without_connecting() -> None:
    client = connect(RedisSettings(url="redis+sentinel://:pw@s1:26379,s2/mymaster/2"))
    try:
        assert client.connection_pool.service_name == "mymaster"  # type: ignore[attr-defined]
        assert client.connection_pool.connection_kwargs["db"] == 2
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://s1:26379", "redis+sentinel://s1:x/mymaster", "redis+sentinel://s1/m/x"],
)
def test_a_malformed_sentinel_url_is_a_config_error_naming_redis_url(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        connect(RedisSettings(url=url))
    assert info.value.key == "redis.url"


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
async def test_a_policy_that_may_evict_the_limiters_keys_is_refused(
    redis_client: aioredis.Redis, policy: str
) -> None:
    await redis_client.config_set("maxmemory-policy", policy)
    try:
        with pytest.raises(ConfigError) as error:
            await check_eviction_policy(redis_client)
        assert error.value.key == "redis.url"
        assert f"maxmemory-policy is {policy}" in error.value.message
    finally:
        await redis_client.config_set("maxmemory-policy", "volatile-lru")


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-ttl", "noeviction"])
async def test_policies_that_spare_keys_without_a_ttl_are_accepted(
    redis_client: aioredis.Redis, policy: str
) -> None:
    await redis_client.config_set("maxmemory-policy", policy)
    try:
        await check_eviction_policy(redis_client)
    finally:
        await redis_client.config_set("maxmemory-policy", "volatile-lru")


async def test_an_unreadable_policy_is_a_warning_not_a_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)
    try:
        await check_eviction_policy(client)
    finally:
        await client.aclose()
    assert "cannot read Redis maxmemory-policy" in caplog.text
