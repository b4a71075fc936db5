"""Redis clients from settings: a plain URL, or the master/replica found through Sentinel.

Two identities: :func:`connect` is the writer's client (FLEETPULSE_REDIS_USERNAME),
:func:`connect_reader` and :func:`connect_reader_async` the readers' (FLEETPULSE_REDIS_API_
USERNAME), each Redis ACL user allowed only what its role sends (state/acl.py).
A ``rediss://`` URL is TLS, its certificate checked against FLEETPULSE_REDIS_CA_FILE.

Clients speak RESP2 and return bytes (payloads are JSON for msgspec, which takes
bytes). The blocking clients set no socket read timeout, because
:meth:`RedisStateReader.changes` may block in XREAD for as long as its caller asks;
connecting is bounded. The asyncio client of the query routes
(:func:`connect_reader_async`) only makes short reads, so its reads time out too.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.sentinel
from redis.connection import parse_url
from redis.sentinel import Sentinel

from fleetpulse.errors import ConfigError
from fleetpulse.settings import Settings, env_name, masked_url
from state.keys import Keys

__all__ = [
    "READER",
    "WRITER",
    "Role",
    "check",
    "close_async",
    "connect",
    "connect_reader",
    "connect_reader_async",
    "refused",
]

# The two Redis identities (least privilege): the writer is the dataflow's sink and the
# tools that write; the reader is the query API, the dashboard and the SSE stream.
Role = Literal["writer", "reader"]
WRITER: Role = "writer"
READER: Role = "reader"

_AUTH = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0  # the asyncio client's reads (short ones only: no blocking XREAD)
HEALTH_CHECK_S = 30  # PING an idle pooled connection before reuse after this long


def connect(settings: Settings) -> redis.Redis:
    """The client for writes: ``settings.redis_dsn``, or the Sentinel-monitored master.

    It authenticates as the writer (FLEETPULSE_REDIS_USERNAME/_PASSWORD, else the URL's
    user). With Sentinel the client follows a failover: its pool asks the Sentinels for
    the master again when a connection fails or answers READONLY.
    """
    if settings.redis_sentinels:
        master = _sentinel(settings, WRITER).master_for(settings.redis_sentinel_master)  # type: ignore[no-untyped-call]
        return cast(redis.Redis, master)
    pool = redis.ConnectionPool(**_node_kwargs(settings, WRITER, parse_url), **_common())
    return redis.Redis.from_pool(pool)


def connect_reader(settings: Settings) -> redis.Redis:
    """The client for API reads: a replica when Sentinel and read_from_replicas are set.

    It authenticates as the reader (FLEETPULSE_REDIS_API_USERNAME/_PASSWORD, else the
    writer's credentials). Otherwise the same kind of client as :func:`connect`.
    Replica reads may lag the master by the replication delay.
    """
    if settings.redis_sentinels:
        sentinel = _sentinel(settings, READER)
        name = settings.redis_sentinel_master
        if settings.redis_read_from_replicas:  # redis-py falls back to the master
            return cast(redis.Redis, sentinel.replica_for(name))  # type: ignore[no-untyped-call]
        return cast(redis.Redis, sentinel.master_for(name))  # type: ignore[no-untyped-call]
    pool = redis.ConnectionPool(**_node_kwargs(settings, READER, parse_url), **_common())
    return redis.Redis.from_pool(pool)


def connect_reader_async(settings: Settings) -> redis.asyncio.Redis:
    """:func:`connect_reader` on redis.asyncio, for reads awaited on an event loop.

    The same server (a replica with Sentinel and read_from_replicas, else the master or
    the URL's), db, credentials and TLS; reads time out after :data:`READ_TIMEOUT_S`.
    """
    common = {**_common(), "socket_timeout": READ_TIMEOUT_S}
    if settings.redis_sentinels:
        nodes, node = _sentinel_args(settings, READER)
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            nodes, sentinel_kwargs=_sentinel_kwargs(settings), **node, **common
        )
        name = settings.redis_sentinel_master
        if settings.redis_read_from_replicas:  # redis-py falls back to the master
            return cast(redis.asyncio.Redis, sentinel.replica_for(name))
        return cast(redis.asyncio.Redis, sentinel.master_for(name))
    kwargs = _node_kwargs(settings, READER, redis.asyncio.connection.parse_url)
    pool = redis.asyncio.ConnectionPool(**kwargs, **common)
    return redis.asyncio.Redis.from_pool(pool)


def check(settings: Settings, role: Role) -> None:
    """PING Redis once as ``role`` (:data:`WRITER` or :data:`READER`), and read whether
    a key under ``redis_prefix`` exists, for start-up.

    Raises :class:`ConfigError` naming the settings to fix when Redis refuses the
    credentials, the user lacks a permission, or the TLS handshake fails; a server that
    is merely unreachable is not an error here (clients retry; /readyz reports it).
    """
    client = connect(settings) if role == WRITER else connect_reader(settings)
    try:
        client.ping()
        # A key under the prefix: an ACL user made for another prefix is refused here.
        client.exists(Keys(settings.redis_prefix).summary)
    except redis.RedisError as exc:
        problem = refused(exc, settings, role)
        if problem is not None:
            raise ConfigError(problem) from None
    finally:
        client.close()


def refused(exc: BaseException, settings: Settings, role: Role) -> str | None:
    """What to fix when ``exc`` means Redis refused ``role``'s credentials, a command
    (ACL) or the TLS handshake; None for any other error (an outage passes)."""
    user, password = _credential_names(role)
    if isinstance(exc, _AUTH):
        return (
            f"Redis refused the {role}'s credentials ({exc}); check {user} and {password} "
            "(or the user and password in "
            f"{env_name('redis_url')}) against the server's ACL users"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"Redis refused a command of the {role} ({exc}); the ACL user {user} names "
            "lacks a permission the product needs, or was made for another key prefix than "
            f"{env_name('redis_prefix')}={settings.redis_prefix!r} (state/acl.py makes the users)"
        )
    cause = exc.__context__ or exc.__cause__
    if isinstance(exc, redis.ConnectionError) and isinstance(cause, ssl.SSLError):
        return (
            f"the TLS handshake with Redis failed ({cause}); "
            f"{env_name('redis_ca_file')}={settings.redis_ca_file!r} must name the PEM of the "
            "CA that signed the server's certificate (and the URL's host must be in it)"
        )
    return None


async def close_async(client: redis.asyncio.Redis) -> None:
    """Close a client of :func:`connect_reader_async`: its pool, and the connections to
    the Sentinels when it came through them."""
    await client.aclose(close_connection_pool=True)
    sentinels = getattr(client.connection_pool, "sentinel_manager", None)
    if sentinels is not None:
        await sentinels.aclose()


def _common() -> dict[str, Any]:
    return {"socket_connect_timeout": CONNECT_TIMEOUT_S, "health_check_interval": HEALTH_CHECK_S}


def _credential_names(role: Role) -> tuple[str, str]:
    if role == WRITER:
        return env_name("redis_username"), env_name("redis_password")
    return env_name("redis_api_username"), env_name("redis_api_password")


def _credentials(settings: Settings, role: Role) -> dict[str, str]:
    """The user and password of ``role`` from the settings; {} to keep the URL's."""
    s = settings
    if role == READER and (s.redis_api_username or s.redis_api_password):
        return {"username": s.redis_api_username or "default", "password": s.redis_api_password}
    if s.redis_username or s.redis_password:
        return {"username": s.redis_username or "default", "password": s.redis_password}
    return {}


def _tls(settings: Settings) -> dict[str, Any]:
    """The certificate checks of a TLS connection: required, against the CA file if set."""
    ca = settings.redis_ca_file
    if not ca:
        return {"ssl_cert_reqs": "required"}
    if not Path(ca).is_file():
        raise ConfigError(
            f"{env_name('redis_ca_file')}={ca!r}: no such file (the PEM of the CA that signed "
            "the Redis servers' certificates)"
        )
    return {"ssl_cert_reqs": "required", "ssl_ca_certs": ca}


def _url_kwargs(settings: Settings, parse: Callable[[str], Any] = parse_url) -> dict[str, Any]:
    try:
        return dict(parse(settings.redis_dsn))
    except ValueError as exc:
        raise ConfigError(
            f"{env_name('redis_url')}={masked_url(settings.redis_dsn)!r} is not a Redis URL "
            f"({exc}); expected e.g. redis://host:6379/0 or rediss://user:password@host:6380/0"
        ) from None


def _node_kwargs(settings: Settings, role: Role, parse: Callable[[str], Any]) -> dict[str, Any]:
    """A data node's connection: the URL's, with ``role``'s credentials and the TLS checks."""
    kwargs = _url_kwargs(settings, parse)
    kwargs.update(_credentials(settings, role))
    if settings.redis_dsn.startswith("rediss://"):
        kwargs.update(_tls(settings))
    return kwargs


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How the clients reach the Sentinels themselves: their own user, TLS if asked."""
    s = settings
    kwargs: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S}
    if s.redis_sentinel_username or s.redis_sentinel_password:
        kwargs["username"] = s.redis_sentinel_username or "default"
        kwargs["password"] = s.redis_sentinel_password
    if s.redis_sentinel_tls:
        kwargs.update(ssl=True, **_tls(s))
    return kwargs


def _sentinel(settings: Settings, role: Role) -> Sentinel:
    nodes, node = _sentinel_args(settings, role)
    return Sentinel(  # type: ignore[no-untyped-call]
        nodes, sentinel_kwargs=_sentinel_kwargs(settings), **node, **_common()
    )


def _sentinel_args(settings: Settings, role: Role) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The Sentinel nodes, and what the data nodes need: db, ``role``'s credentials, TLS."""
    url = _url_kwargs(settings)
    node = {k: v for k, v in url.items() if k not in ("host", "port", "path", "connection_class")}
    node.update(_credentials(settings, role))
    if settings.redis_dsn.startswith("rediss://"):
        node["ssl"] = True  # the Sentinel pool then picks its TLS connection class
        node.update(_tls(settings))
    nodes = []
    for item in settings.redis_sentinels.split(","):
        host, _, port = item.rpartition(":")
        nodes.append((host, int(port)))
    return nodes, node
