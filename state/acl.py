"""The Redis ACL users of least privilege: what the writer and the reader may send.

Redis checks every command against its user's rules, commands run inside Lua
(``redis.call``) included. So the lists below are every command the writer
(:mod:`state.writer` and its scripts, :mod:`state.projection`, the robot retirement's
deletes) and the reader (:mod:`state.reads`, :mod:`state.reader`, the SSE tail) send,
and what redis-py sends on connect (AUTH and HELLO are always allowed; SELECT). The
integration tests run the real writer and the real query routes against a server
holding exactly these users, and check that each is refused the rest.

- **writer** (the dataflow's sink, ``rebuild-state``): its commands on ``~<prefix>:*``
  only; no FLUSHALL, CONFIG, KEYS, DEBUG, ACL, SHUTDOWN, no keyspace scans, no pub/sub.
- **reader** (query API, dashboard, /v1/stream): Redis' read commands (``@read``) less
  the dangerous ones and those that list keys whatever their name (SCAN, RANDOMKEY),
  on ``~<prefix>:*``; EVALSHA_RO/EVAL_RO for the paging script (a read-only script:
  Redis refuses a write inside it) and SCRIPT LOAD to cache it.
- **default**: off; or PING only (anonymous health checks, compose); or (``admin_password``)
  a full user for operators, replication and the Sentinels (``masterauth``,
  ``sentinel auth-pass``: Kubernetes); open only in the local stack, for development.

Passwords are stored as their SHA-256 (``#<hex>``), so the file holds no secret.
``python -m state.acl`` writes the file for the users the settings name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec

from fleetpulse.errors import ConfigError, FleetpulseError
from fleetpulse.settings import Settings, env_name, load_settings

__all__ = [
    "READER_COMMANDS",
    "WRITER_COMMANDS",
    "RedisUsers",
    "acl_file",
    "reader_rules",
    "writer_rules",
]

# Sent on connect by redis-py, or by health checks. (redis-py's CLIENT SETINFO is left
# out: Redis 7.0, Debian's, does not know it and would refuse the whole file; on 7.2+
# it is refused and redis-py goes on without it.)
_CONNECT = ("ping", "select")

WRITER_COMMANDS = (
    *_CONNECT,
    # state.writer: the state write (one read, then MULTI/EXEC) and its scripts
    "hmget", "multi", "exec", "discard", "hset", "zadd", "zrem", "lpush", "ltrim", "xadd",
    "eval", "evalsha", "script|load",
    # inside the scripts (state.scripts)
    "hget", "hincrby", "hdel", "hexists", "zscore", "zcard", "zrange", "zremrangebyrank",
    # state.projection: the run_id of the server, the re-publish bookkeeping
    "info", "get", "set", "sadd", "scard", "expire", "del",
    # robot retirement (state.writer, admin): its reads and deletes on the same keys
    "unlink", "srem", "smembers", "hgetall", "zrangebyscore", "zrevrangebyscore", "lrange",
    "xrevrange", "exists", "watch", "unwatch", "hscan", "zscan", "sscan",
)  # fmt: skip

# Read commands that are refused all the same: they see keys outside the prefix
# (a keyless command is not filtered by the key pattern).
_READER_DENIED = ("keys", "scan", "randomkey")
READER_COMMANDS = (*_CONNECT, "evalsha_ro", "eval_ro", "script|load")


def writer_rules(prefix: str) -> list[str]:
    """The writer's rules, after its name, state and password."""
    return [f"~{prefix}:*", "resetchannels", "-@all", *(f"+{c}" for c in WRITER_COMMANDS)]


def reader_rules(prefix: str) -> list[str]:
    """The reader's rules: reads only, on the product's keys."""
    return [
        f"~{prefix}:*",
        "resetchannels",
        "-@all",
        "+@read",
        "-@dangerous",
        *(f"-{c}" for c in _READER_DENIED),
        *(f"+{c}" for c in READER_COMMANDS),
    ]


def _password(secret: str) -> str:
    return "#" + hashlib.sha256(secret.encode()).hexdigest() if secret else "nopass"


# What the ``default`` user may do when it has no password: nothing (off), only PING
# (anonymous health checks: compose), or everything (the local stack, for development).
DefaultUser = Literal["off", "ping", "open"]
_DEFAULT_RULES: dict[str, str] = {
    "off": "user default reset off",
    "ping": "user default reset on nopass resetchannels -@all +ping",
    "open": "user default reset on nopass ~* &* +@all",
}


def acl_file(
    settings: Settings, admin_password: str | None = None, *, default: DefaultUser = "off"
) -> str:
    """The ACL file (``aclfile``) for the writer and reader users the settings name.

    Raises :class:`ConfigError` unless both users are named with a password, and they
    differ. With ``admin_password``, ``default`` is a full user with that password
    (operators, replication, the Sentinels: ``masterauth``, ``sentinel auth-pass``);
    without, ``default`` is as :data:`DefaultUser` says (off unless asked).
    """
    s = settings
    for user, password in (("redis_username", "redis_password"),
                           ("redis_api_username", "redis_api_password")):  # fmt: skip
        if not getattr(s, user) or not getattr(s, password):
            raise ConfigError(f"an ACL file needs {env_name(user)} and {env_name(password)} set")
    if s.redis_username == s.redis_api_username or "default" in (
        s.redis_username,
        s.redis_api_username,
    ):
        raise ConfigError(
            f"{env_name('redis_username')} and {env_name('redis_api_username')} must be two "
            "users, neither `default`"
        )
    prefix = s.redis_prefix
    lines = [
        f"user {s.redis_username} reset on {_password(s.redis_password)} "
        + " ".join(writer_rules(prefix)),
        f"user {s.redis_api_username} reset on {_password(s.redis_api_password)} "
        + " ".join(reader_rules(prefix)),
    ]
    if admin_password:
        lines.append(f"user default reset on {_password(admin_password)} ~* &* +@all")
    else:
        lines.append(_DEFAULT_RULES[default])
    return "\n".join(lines) + "\n"


class RedisUsers(NamedTuple):
    """The writer's and the reader's user and password (the local stack keeps them in a
    JSON file of mode 0600, made once with random passwords)."""

    writer: str
    writer_password: str
    reader: str
    reader_password: str

    @classmethod
    def kept(cls, path: Path) -> RedisUsers:
        """The users kept in ``path``, made and kept there on first use."""
        if path.exists():
            return cls(**json.loads(path.read_text()))
        users = cls("fleetpulse-sink", secrets.token_urlsafe(24),
                    "fleetpulse-api", secrets.token_urlsafe(24))  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(users._asdict()))
        return users

    def writer_env(self) -> dict[str, str]:
        """The variables of a process that writes (the dataflow): the writer only."""
        return {env_name("redis_username"): self.writer,
                env_name("redis_password"): self.writer_password}  # fmt: skip

    def reader_env(self) -> dict[str, str]:
        """The variables of a process that only reads (query API, dashboard)."""
        return {env_name("redis_api_username"): self.reader,
                env_name("redis_api_password"): self.reader_password}  # fmt: skip

    def settings(self, base: Settings) -> Settings:
        """``base`` with both users set (what :func:`acl_file` takes)."""
        return msgspec.structs.replace(
            base,
            redis_username=self.writer,
            redis_password=self.writer_password,
            redis_api_username=self.reader,
            redis_api_password=self.reader_password,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="state.acl",
        description="write the Redis ACL file for the writer and reader users of the "
        "settings (FLEETPULSE_REDIS_USERNAME/_PASSWORD, FLEETPULSE_REDIS_API_USERNAME/"
        "_PASSWORD, FLEETPULSE_REDIS_PREFIX)",
    )
    parser.add_argument("out", type=Path, help="the file to write (mode 0600)")
    parser.add_argument(
        "--admin-password-file",
        type=Path,
        help="a file holding the password of the `default` user; without it, it is off",
    )
    args = parser.parse_args(argv)
    try:
        admin = None
        if args.admin_password_file is not None:
            admin = args.admin_password_file.read_text().strip()
        text = acl_file(load_settings(), admin)
    except (FleetpulseError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.touch(mode=0o600)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
