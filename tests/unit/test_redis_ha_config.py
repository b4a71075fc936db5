"""The ha overlay's Redis start script (deploy/k8s/overlays/ha/redis/render-config.sh), run
with sh and a stub redis-cli: which master a pod follows (the Sentinels' answer, else
redis-0), and the redis.conf / sentinel.conf it writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "k8s" / "overlays" / "ha" / "redis" / "render-config.sh"

# The stub answers `sentinel get-master-addr-by-name` as $STUB_ANSWER says (empty: the
# Sentinel is unreachable, exit 1) and logs the host it was asked.
STUB = """#!/bin/sh
echo "$2" >> "$STUB_LOG"
[ -n "$STUB_ANSWER" ] || exit 1
printf '%b\\n' "$STUB_ANSWER"
"""


def _run(tmp_path: Path, pod: str, answer: str = "", **extra: str) -> tuple[dict[str, str], str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    stub = tmp_path / "redis-cli"
    stub.write_text(STUB)
    stub.chmod(0o755)
    conf = tmp_path / "conf"
    env = {
        "PATH": os.environ["PATH"],
        "POD_NAME": pod,
        "SERVICE": "redis",
        "REPLICAS": "3",
        "REDIS_PORT": "6379",
        "SENTINEL_PORT": "26379",
        "SENTINEL_QUORUM": "2",
        "CONF_DIR": str(conf),
        "FLEETPULSE_REDIS_SENTINEL_MASTER": "fleetpulse",
        "FLEETPULSE_SENTINEL_DOWN_AFTER_MS": "5000",
        "FLEETPULSE_SENTINEL_FAILOVER_TIMEOUT_MS": "15000",
        "REDIS_CLI": str(stub),
        "STUB_ANSWER": answer,
        "STUB_LOG": str(tmp_path / "asked"),
        **extra,
    }
    done = subprocess.run(
        ["sh", str(SCRIPT)], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    files = {p.name: p.read_text() for p in conf.iterdir()}
    return files, done.stdout


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_first_start_redis_0_is_the_master_and_the_others_replicate_it(tmp_path: Path) -> None:
    files, out = _run(tmp_path / "0", "redis-0")
    assert _lines(files["redis.conf"], "replicaof") == []
    assert "redis-0.redis starts as the master" in out
    files, _ = _run(tmp_path / "2", "redis-2")
    assert _lines(files["redis.conf"], "replicaof") == ["replicaof redis-0.redis 6379"]
    assert "replica-announce-ip redis-2.redis" in files["redis.conf"].splitlines()
    sentinel = files["sentinel.conf"].splitlines()
    assert "sentinel monitor fleetpulse redis-0.redis 6379 2" in sentinel
    assert "sentinel down-after-milliseconds fleetpulse 5000" in sentinel
    assert "sentinel failover-timeout fleetpulse 15000" in sentinel
    assert "sentinel announce-ip redis-2.redis" in sentinel
    assert "port 26379" in sentinel
    # Hostnames must be resolvable before the monitor line names one.
    assert sentinel.index("sentinel resolve-hostnames yes") < sentinel.index(
        "sentinel monitor fleetpulse redis-0.redis 6379 2"
    )
    assert "sentinel announce-hostnames yes" in sentinel


def test_a_restarted_pod_follows_the_master_the_sentinels_know(tmp_path: Path) -> None:
    # After a failover to redis-1, redis-0 comes back as its replica, not as a master.
    files, out = _run(tmp_path, "redis-0", answer="redis-1.redis\\n6379")
    assert _lines(files["redis.conf"], "replicaof") == ["replicaof redis-1.redis 6379"]
    assert "sentinel monitor fleetpulse redis-1.redis 6379 2" in files["sentinel.conf"]
    assert "from the Sentinel on redis-1.redis" in out
    # It asked the first other pod's Sentinel, never its own, and stopped at an answer.
    assert (tmp_path / "asked").read_text().split() == ["redis-1.redis"]


def test_the_current_master_restarted_starts_as_the_master(tmp_path: Path) -> None:
    files, _ = _run(tmp_path, "redis-1", answer="redis-1.redis\\n6379")
    assert _lines(files["redis.conf"], "replicaof") == []
    assert "sentinel monitor fleetpulse redis-1.redis 6379 2" in files["sentinel.conf"]


@pytest.mark.parametrize("answer", ["", "ERR No such master with that name", "\\n"])
def test_no_usable_answer_falls_back_to_redis_0(tmp_path: Path, answer: str) -> None:
    files, out = _run(tmp_path, "redis-2", answer=answer)
    assert _lines(files["redis.conf"], "replicaof") == ["replicaof redis-0.redis 6379"]
    assert "no Sentinel answered" in out
    assert (tmp_path / "asked").read_text().split() == ["redis-0.redis", "redis-1.redis"]


def test_a_missing_input_stops_the_script(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _run(tmp_path, "redis-0", FLEETPULSE_SENTINEL_DOWN_AFTER_MS="")
    assert "FLEETPULSE_SENTINEL_DOWN_AFTER_MS" in failed.value.stderr


def test_with_acl_users_replicas_and_sentinels_authenticate_as_the_admin(tmp_path: Path) -> None:
    files, _ = _run(
        tmp_path / "1", "redis-1", ACL_FILE="/etc/redis-acl/users.acl", REDIS_ADMIN_PASSWORD="pw9"
    )
    redis_conf, sentinel = files["redis.conf"].splitlines(), files["sentinel.conf"].splitlines()
    assert "aclfile /etc/redis-acl/users.acl" in redis_conf
    assert "masterauth pw9" in redis_conf  # the replica, to its master
    assert "sentinel auth-pass fleetpulse pw9" in sentinel
    assert sentinel.index("sentinel monitor fleetpulse redis-0.redis 6379 2") < sentinel.index(
        "sentinel auth-pass fleetpulse pw9"
    )
    for name in ("redis.conf", "sentinel.conf"):  # they hold the password
        assert (tmp_path / "1" / "conf" / name).stat().st_mode & 0o777 == 0o600
    # An unfilled redis-acl Secret (both empty): no ACL, no passwords, as before.
    files, _ = _run(tmp_path / "2", "redis-2", ACL_FILE="", REDIS_ADMIN_PASSWORD="")
    assert "aclfile" not in files["redis.conf"] and "masterauth" not in files["redis.conf"]
    assert "auth-pass" not in files["sentinel.conf"]
