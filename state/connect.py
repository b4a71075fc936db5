"""Redis clients from settings: a plain URL, or the master/replica found through Sentinel.

Clients speak RESP2 and return bytes (payloads are JSON for msgspec, which takes
bytes). No socket read timeout is set, because :meth:`RedisStateReader.changes` may
block in XREAD for as long as its caller asks; connecting is bounded.
"""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.connection import parse_url
from redis.sentinel import Sentinel

from fleetpulse.errors import ConfigError
from fleetpulse.settings import Settings, env_name

__all__ = ["connect", "connect_reader"]

CONNECT_TIMEOUT_S = 5.0
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
    # The URL then only supplies what the data nodes need: db, credentials, TLS.
    url = _url_kwargs(settings)
    node = {k: v for k, v in url.items() if k not in ("host", "port", "path", "connection_class")}
    if settings.redis_dsn.startswith("rediss://"):
        node["ssl"] = True  # the Sentinel pool then picks its TLS connection class
    nodes = []
    for item in settings.redis_sentinels.split(","):
        host, _, port = item.rpartition(":")
        nodes.append((host, int(port)))
    return Sentinel(  # type: ignore[no-untyped-call]
        nodes,
        sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT_S},
        **node,
        **_common(),
    )
