"""The Redis client the app builds: short budgets, and the URL forms it accepts."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway.errors import ConfigError
from gateway.redis_client import connect
from gateway.settings import RedisSettings
from tests.support.processes import RedisServer


async def test_a_plain_url_gets_a_blocking_pool_with_the_configured_budget(
    redis_server: RedisServer,
) -> None:
    client = connect(RedisSettings(url=redis_server.url, timeout_ms=300, pool_size=7))
    try:
        pool = client.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == 7
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
