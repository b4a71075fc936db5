"""Redis clients from settings: a plain URL, or the master/replica found through Sentinel.

Clients speak RESP2 and return bytes (payloads are JSON for msgspec, which takes
bytes). The blocking clients set no socket read timeout, because
:meth:`RedisStateReader.changes` may block in XREAD for as long as its caller asks;
connecting is bounded. The asyncio client of the query routes
(:func:`connect_reader_async`) only makes short reads, so its reads time out too.
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.sentinel
from redis.connection import parse_url
from redis.sentinel import Sentinel

from fleetpulse.errors import ConfigError
from fleetpulse.settings import Settings, env_name

__all__ = ["close_async", "connect", "connect_reader", "connect_reader_async"]

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0  # the asyncio client's reads (short ones only: no blocking XREAD)
HEALTH_CHECK_S = 30  # PING an idle pooled connection before reuse after this long


def connect(settings: Settings) -> redis.Redis:
    """The client for writes: ``settings.redis_dsn``, or the Sentinel-monitored master.

    With Sentinel the client follows a failover: its pool asks the Sentinels for the
    master again when a connection fails or answers READONLY.
    """
    if settings.redis_sentinels:
        master = _sentinel(settings).master_for(settings.redis_sentinel_master)  # type: ignore[no-untyped-call]
        return cast(redis.Redis, master)
    _url_kwargs(settings)  # a bad URL is a ConfigError naming the variable
    return redis.Redis.from_url(settings.redis_dsn, **_common())


def connect_reader(settings: Settings) -> redis.Redis:
    """The client for API reads: a replica when Sentinel and read_from_replicas are set.

    Otherwise the same kind of client as :func:`connect`. Replica reads may lag the
    master by the replication delay.
    """
    if settings.redis_sentinels and settings.redis_read_from_replicas:
        # redis-py falls back to the master when no replica is up.
        replica = _sentinel(settings).replica_for(settings.redis_sentinel_master)  # type: ignore[no-untyped-call]
        return cast(redis.Redis, replica)
    return connect(settings)


def connect_reader_async(settings: Settings) -> redis.asyncio.Redis:
    """:func:`connect_reader` on redis.asyncio, for reads awaited on an event loop.

    The same server (a replica with Sentinel and read_from_replicas, else the master or
    the URL's), db and credentials; reads time out after :data:`READ_TIMEOUT_S`.
    """
    common = {**_common(), "socket_timeout": READ_TIMEOUT_S}
    if settings.redis_sentinels:
        nodes, node = _sentinel_args(settings)
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            nodes, sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT_S}, **node, **common
        )
        name = settings.redis_sentinel_master
        if settings.redis_read_from_replicas:  # redis-py falls back to the master
            return cast(redis.asyncio.Redis, sentinel.replica_for(name))
        return cast(redis.asyncio.Redis, sentinel.master_for(name))
    _url_kwargs(settings)  # a bad URL is a ConfigError naming the variable
    return redis.asyncio.Redis.from_url(settings.redis_dsn, **common)


async def close_async(client: redis.asyncio.Redis) -> None:
    """Close a client of :func:`connect_reader_async`: its pool, and the connections to
    the Sentinels when it came through them."""
    await client.aclose(close_connection_pool=True)
    sentinels = getattr(client.connection_pool, "sentinel_manager", None)
    if sentinels is not None:
        await sentinels.aclose()


def _common() -> dict[str, Any]:
    return {"socket_connect_timeout": CONNECT_TIMEOUT_S, "health_check_interval": HEALTH_CHECK_S}


def _url_kwargs(settings: Settings) -> dict[str, Any]:
    try:
        return dict(parse_url(settings.redis_dsn))  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(
            f"{env_name('redis_url')}={settings.redis_dsn!r} is not a Redis URL ({exc}); "
            "expected e.g. redis://host:6379/0 or rediss://user:password@host:6380/0"
        ) from None


def _sentinel(settings: Settings) -> Sentinel:
    nodes, node = _sentinel_args(settings)
    return Sentinel(  # type: ignore[no-untyped-call]
        nodes,
        sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT_S},
        **node,
        **_common(),
    )


def _sentinel_args(settings: Settings) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The Sentinel nodes, and what the data nodes need from the URL: db, credentials, TLS."""
    url = _url_kwargs(settings)
    node = {k: v for k, v in url.items() if k not in ("host", "port", "path", "connection_class")}
    if settings.redis_dsn.startswith("rediss://"):
        node["ssl"] = True  # the Sentinel pool then picks its TLS connection class
    nodes = []
    for item in settings.redis_sentinels.split(","):
        host, _, port = item.rpartition(":")
        nodes.append((host, int(port)))
    return nodes, node
