"""Least privilege in Redis: the ACL users of state.acl and TLS, on a real redis-server.

The server is this module's own (a free port, a tmp folder), started with the ACL file
``state.acl`` makes and a TLS port whose certificate comes from the project's CA
(``deploy.local.tls``), so the shared stack's Redis and its default user are untouched.
The real writer writes with the writer user; the real query app reads with the reader
user; each is refused what its role does not need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from litestar.testing import TestClient

from api.app import create_app
from api.auth import hash_token, new_token
from api.query import AlertList, ReportList, RobotPage, WindowList
from deploy.local.main import _redis_users
from deploy.local.procs import free_port
from deploy.local.services import Redis
from deploy.local.stack import Stack
from deploy.local.tls import ServerCert, make_server_cert
from fleetpulse.alert_rules import Incident
from fleetpulse.errors import ConfigError
from fleetpulse.schema import LiveState
from fleetpulse.settings import Settings, load_settings
from state import FleetSummary, RedisStateReader, RedisStateWriter
from state.acl import RedisUsers, acl_file
from state.connect import READER, WRITER, check, connect, connect_reader
from state.projection import Projection
from tests.integration.test_state_contract import alert, live, window

pytestmark = pytest.mark.integration

READ = new_token()
ADMIN = "admin-" + uuid.uuid4().hex
SINK_PASSWORD = "sink-" + uuid.uuid4().hex
API_PASSWORD = "api-" + uuid.uuid4().hex


@dataclass
class AclServer:
    """A redis-server of this module: plain ``port`` and TLS ``tls_port``, ACL users on."""

    port: int
    tls_port: int
    tls: ServerCert
    prefix: str

    def settings(self, *, tls: bool = False, **overrides: Any) -> Settings:
        """The product's settings for this server, both users configured."""
        env = {
            "FLEETPULSE_REDIS_URL": f"redis://127.0.0.1:{self.port}/0",
            "FLEETPULSE_REDIS_PREFIX": self.prefix,
            "FLEETPULSE_REDIS_USERNAME": "fp-sink",
            "FLEETPULSE_REDIS_PASSWORD": SINK_PASSWORD,
            "FLEETPULSE_REDIS_API_USERNAME": "fp-api",
            "FLEETPULSE_REDIS_API_PASSWORD": API_PASSWORD,
            "FLEETPULSE_API_TOKENS": f"read:{hash_token(READ)}",
        }
        if tls:
            env["FLEETPULSE_REDIS_URL"] = f"rediss://127.0.0.1:{self.tls_port}/0"
            env["FLEETPULSE_REDIS_CA_FILE"] = str(self.tls.ca)
        env.update(overrides)
        return load_settings(env)

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=ADMIN)

    def users(self) -> set[str]:
        """The users of the clients connected now (ACL WHOAMI is not theirs to run)."""
        with self.admin() as admin:
            return {c["user"] for c in admin.client_list()} - {"default"}


def _start(root: Path, port: int, args: list[str]) -> subprocess.Popen[bytes]:
    with (root / f"redis-{port}.log").open("wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root), *args],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            return proc
        except (redis.AuthenticationError, redis.ResponseError):
            return proc  # up, and refusing an unauthenticated PING
        except redis.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            text = (root / f"redis-{port}.log").read_text()[-1500:]
            pytest.fail(f"the test's redis-server did not start:\n{text}", pytrace=False)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    root = tmp_path_factory.mktemp("redis-acl")
    tls = make_server_cert(root / "tls", "redis")
    server = AclServer(free_port(), free_port(), tls, f"acl{uuid.uuid4().hex[:8]}")
    aclfile = root / "users.acl"
    aclfile.write_text(acl_file(server.settings(), admin_password=ADMIN))
    proc = _start(
        root,
        server.port,
        ["--aclfile", str(aclfile), "--tls-port", str(server.tls_port),
         "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
         "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no",
         "--enable-debug-command", "yes"],  # so that it is the ACL that refuses DEBUG
    )  # fmt: skip
    try:
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


def _batch() -> tuple[list[LiveState], list[Any], list[Any]]:
    states = [
        live("amr-1", 1, status="moving", battery=80.0, site="north"),
        live("amr-2", 1, status="charging", battery=15.0, site="south"),
        live("amr-1", 2, status="working", battery=79.0, site="north"),
    ]
    windows = [window("amr-1", 0, count=7), window("amr-1", 1, count=3)]
    alerts = [alert("amr-2", "low_battery", 1)]
    return states, windows, alerts


def _noperm(call: Any) -> str:
    with pytest.raises(redis.exceptions.NoPermissionError) as info:
        call()
    return str(info.value)


def test_the_writer_user_writes_a_batch_and_nothing_else(acl_server: AclServer) -> None:
    s = acl_server.settings()
    client = connect(s)
    try:
        assert client.ping() and acl_server.users() == {"fp-sink"}
        writer = RedisStateWriter(client, s)  # SCRIPT LOAD
        states, windows, alerts = _batch()
        result = writer.write(states, windows, alerts)
        assert (result.states_applied, result.windows_applied, result.alerts_added) == (3, 2, 1)
        again = writer.write(states, windows, alerts)  # a replay changes nothing
        assert (again.applied, again.ignored) == (0, 6)
        # Incidents and a retirement (its reads, deletes, tombstone and counters).
        extra = live("amr-x", 1, battery=5.0, site="north")
        opened = Incident(
            id="amr-x:low:0:1",
            robot_id="amr-x",
            rule="low",
            severity="critical",
            since=extra.report.ts,
            opened_at=extra.report.ts,
            opened_by=(0, 1),
        )
        assert writer.write([extra], [], [], incidents=[opened]).incidents_applied == 1
        gone = writer.write([], [], [], retired=[("amr-x", 2_000_000_000_000)])
        assert gone.retired == 1
        # The projection's bookkeeping: INFO, SET NX EX, SADD/EXPIRE/SCARD, GET, DEL.
        projection = Projection(client, s.redis_prefix)
        server = projection.server()
        token = projection.claim(server)
        assert token is not None and projection.under_way() == token
        assert projection.shards_written(token, ["0", "1"], 2) is True
        assert projection.published_to() == server
        # Whatever the user may do, it is only on the product's keys.
        assert "key" in _noperm(lambda: client.set("other:key", "1"))
        assert "key" in _noperm(lambda: client.hset("otherprefix:robot", "a", "1"))
        for refused in (
            client.flushall,
            client.flushdb,
            lambda: client.config_get("*"),
            lambda: client.keys("*"),
            lambda: client.scan(0),
            lambda: client.acl_list(),
            lambda: client.acl_whoami(),
            lambda: client.execute_command("DEBUG", "SLEEP", "0"),
            lambda: client.execute_command("SHUTDOWN", "NOSAVE"),
            lambda: client.publish("chan", "x"),
        ):
            _noperm(refused)
        # A script may not reach outside the prefix either (ACL applies to redis.call).
        outside = "return redis.call('SET', 'other:key', '1')"
        with pytest.raises(redis.ResponseError, match=r"can't access at least one of the keys"):
            client.eval(outside, 0)
    finally:
        client.close()
    admin = acl_server.admin()
    # What the writer wrote is there, read by the admin.
    assert admin.exists("other:key") == 0
    assert admin.hget(f"{s.redis_prefix}:robot:{{amr-1}}", "status") == b"working"
    assert admin.hgetall(f"{s.redis_prefix}:robot:{{amr-x}}") == {b"gone": b"2000000000000"}
    assert admin.zcard(f"{s.redis_prefix}:idx:incidents:open") == 0
    assert admin.hget(f"{s.redis_prefix}:summary", "total") == b"2"


def _serve_reads(s: Settings) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(s, ingest=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {READ}"
        yield c


def _decode(r: Any, kind: type[Any]) -> Any:
    assert r.status_code == 200, r.text
    return msgspec.json.decode(r.content, type=kind)


def _check_routes(c: TestClient[Any]) -> None:
    """Every query route answers from what the writer wrote (see _batch)."""
    assert c.get("/readyz").status_code == 200
    page = _decode(c.get("/v1/robots", params={"limit": 1}), RobotPage)
    assert [x.report.robot_id for x in page.items] == ["amr-1"] and page.next_cursor
    rest = _decode(c.get("/v1/robots", params={"cursor": page.next_cursor}), RobotPage)
    assert [x.report.robot_id for x in rest.items] == ["amr-2"]
    low = _decode(c.get("/v1/robots", params={"battery_lt": 20}), RobotPage)
    assert [x.report.robot_id for x in low.items] == ["amr-2"]
    one = _decode(c.get("/v1/robots/amr-1"), LiveState)
    assert (one.report.seq, one.report.status) == (2, "working")
    history = _decode(c.get("/v1/robots/amr-1/history"), ReportList)
    assert [r.seq for r in history.items] == [2, 1]
    stats = _decode(c.get("/v1/robots/amr-1/stats"), WindowList)
    assert sorted(w.count for w in stats.items) == [3, 7]
    summary = _decode(c.get("/v1/fleet/summary"), FleetSummary)
    assert (summary.total, summary.by_status["charging"], summary.low_battery) == (2, 1, 1)
    alerts = _decode(c.get("/v1/alerts"), AlertList)
    assert [(a.robot_id, a.kind) for a in alerts.items] == [("amr-2", "low_battery")]


def test_the_reader_user_serves_every_query_route_and_cannot_write(
    acl_server: AclServer,
) -> None:
    s = acl_server.settings()
    writer = connect(s)
    RedisStateWriter(writer, s).write(*_batch())
    writer.close()
    for c in _serve_reads(s):
        _check_routes(c)
    reader = connect_reader(s)
    try:
        assert reader.ping() and acl_server.users() == {"fp-api"}
        key = f"{s.redis_prefix}:robot:{{amr-1}}"
        # The change stream behind /v1/stream: XREAD and XINFO.
        assert RedisStateReader(reader, s).changes("0-0", 10, 0)
        for refused in (
            lambda: reader.hset(key, "status", "idle"),
            lambda: reader.delete(key),
            lambda: reader.xadd(f"{s.redis_prefix}:changes", {"data": "x"}),
            lambda: reader.eval("return 1", 0),
            lambda: reader.evalsha("0" * 40, 0),
            lambda: reader.flushall(),
            lambda: reader.keys("*"),
            lambda: reader.scan(0),
            lambda: reader.get("other:key"),
            lambda: reader.config_get("*"),
        ):
            _noperm(refused)
        # A read-only script may not write, whoever loaded it.
        sha = reader.script_load(f"return redis.call('DEL', '{key}')")
        with pytest.raises(redis.ResponseError):
            reader.execute_command("EVALSHA_RO", sha, 0)
        assert reader.hget(key, "status") == b"working"
    finally:
        reader.close()


def test_writer_and_reader_over_tls_with_the_projects_ca(acl_server: AclServer) -> None:
    s = acl_server.settings(tls=True)
    check(s, WRITER)
    check(s, READER)
    writer = connect(s)
    try:
        assert writer.ping() and acl_server.users() == {"fp-sink"}
        RedisStateWriter(writer, s).write(*_batch())
        assert writer.connection_pool.connection_class.__name__ == "SSLConnection"
    finally:
        writer.close()
    for c in _serve_reads(s):  # the asyncio reader and the blocking one, over TLS
        _check_routes(c)


def test_a_client_without_the_ca_is_refused_naming_the_setting(acl_server: AclServer) -> None:
    s = acl_server.settings(tls=True, FLEETPULSE_REDIS_CA_FILE="")
    with pytest.raises(ConfigError, match="FLEETPULSE_REDIS_CA_FILE") as info:
        check(s, WRITER)
    assert "certificate verify failed" in str(info.value)
    missing = acl_server.settings(tls=True, FLEETPULSE_REDIS_CA_FILE="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match=r"FLEETPULSE_REDIS_CA_FILE=./nonexistent/ca\.pem."):
        connect(missing)


def test_wrong_credentials_stop_start_up_with_a_clear_message(
    acl_server: AclServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = acl_server.settings(FLEETPULSE_REDIS_PASSWORD="wrong")
    with pytest.raises(ConfigError) as info:
        check(bad, WRITER)
    text = str(info.value)
    assert "FLEETPULSE_REDIS_USERNAME" in text and "FLEETPULSE_REDIS_PASSWORD" in text
    assert "wrong" not in text and SINK_PASSWORD not in text
    bad_api = acl_server.settings(FLEETPULSE_REDIS_API_USERNAME="nobody")
    with pytest.raises(ConfigError, match="FLEETPULSE_REDIS_API_USERNAME"):
        check(bad_api, READER)
    # The API server's entry point: one line on stderr, exit status 2, no traceback.
    from api import serve

    env = {
        "FLEETPULSE_REDIS_URL": f"redis://127.0.0.1:{acl_server.port}/0",
        "FLEETPULSE_REDIS_API_USERNAME": "fp-api",
        "FLEETPULSE_REDIS_API_PASSWORD": "wrong",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert serve.main(["query"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Redis refused the reader's credentials")
    assert "Traceback" not in err and "wrong" not in err.replace("WRONGPASS", "")


def test_default_user_off_refuses_anonymous_clients(acl_server: AclServer, tmp_path: Path) -> None:
    text = acl_file(acl_server.settings())
    assert text.splitlines()[-1] == "user default reset off"
    assert SINK_PASSWORD not in text and API_PASSWORD not in text  # only their SHA-256
    (tmp_path / "users.acl").write_text(text)
    port = free_port()
    proc = _start(tmp_path, port, ["--aclfile", str(tmp_path / "users.acl")])
    try:
        with pytest.raises((redis.AuthenticationError, redis.ResponseError), match=r"(?i)auth"):
            redis.Redis(port=port).ping()
        s = acl_server.settings(FLEETPULSE_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        check(s, WRITER)
        check(s, READER)
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_ping_only_default_serves_health_checks_and_nothing_else(
    acl_server: AclServer, tmp_path: Path
) -> None:
    """The compose file's ACL: anonymous PING (the health check), nothing more."""
    (tmp_path / "users.acl").write_text(acl_file(acl_server.settings(), default="ping"))
    port = free_port()
    proc = _start(tmp_path, port, ["--aclfile", str(tmp_path / "users.acl")])
    try:
        anonymous = redis.Redis(port=port)
        assert anonymous.ping() is True
        _noperm(lambda: anonymous.get(f"{acl_server.prefix}:summary"))
        _noperm(lambda: anonymous.config_get("*"))
        anonymous.close()
        check(acl_server.settings(FLEETPULSE_REDIS_URL=f"redis://127.0.0.1:{port}/0"), WRITER)
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_dataflow_stops_at_start_up_on_refused_credentials(acl_server: AclServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPULSE_")}
    env.update(
        FLEETPULSE_REDIS_URL=f"redis://127.0.0.1:{acl_server.port}/0",
        FLEETPULSE_REDIS_USERNAME="fp-sink",
        FLEETPULSE_REDIS_PASSWORD="wrong",
        FLEETPULSE_DATAFLOW_METRICS_PORT="0",
    )
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflows.fleet:build_flow()"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith("error: Redis refused the writer's credentials"), done.stderr
    assert "Traceback" not in done.stderr and "FLEETPULSE_REDIS_PASSWORD" in err[-1]


def test_the_local_stacks_redis_has_the_users_and_keeps_default_open(tmp_path: Path) -> None:
    """The stack's own redis-server command (a test-owned copy on a free port): the
    product's users from <stack dir>/redis-users.json, and `default` open for development."""
    port = free_port()
    base = load_settings(
        {"FLEETPULSE_STACK_DIR": str(tmp_path), "FLEETPULSE_REDIS_PORT": str(port)}
    )
    node = Redis(base, tmp_path)
    command = node.command()
    assert command[command.index("--aclfile") + 1] == str(node.data_dir / "users.acl")
    assert node.users_path.stat().st_mode & 0o777 == 0o600
    users = RedisUsers.kept(node.users_path)
    assert (users.writer, users.reader) == ("fleetpulse-sink", "fleetpulse-api")
    with (tmp_path / "redis.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not node.healthy():  # as the default user, as before
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "redis.log"
            ).read_text()[-1000:]
            time.sleep(0.05)
        s = load_settings(
            {
                "FLEETPULSE_REDIS_PORT": str(port),  # the prefix: the default, fp
                **users.writer_env(),
                **users.reader_env(),
            }
        )
        writer = connect(s)
        RedisStateWriter(writer, s).write(*_batch())
        _noperm(lambda: writer.flushall())
        _noperm(lambda: writer.set("stk:x", "1"))  # another prefix
        writer.close()
        reader = connect_reader(s)
        assert RedisStateReader(reader, s).get("amr-1") is not None
        _noperm(lambda: reader.delete("fp:summary"))
        reader.close()
        # The main job gives the dataflow the writer only, the query servers the reader.
        assert _redis_users(Stack(base), base) == (users.writer_env(), users.reader_env())
    finally:
        proc.terminate()
        proc.wait(10)


def test_sentinel_failover_keeps_working_with_acl_users(
    acl_server: AclServer, tmp_path: Path
) -> None:
    """The Kubernetes ha layout in small: master, replica and a Sentinel, all with the ACL
    file; the replica authenticates with masterauth and the Sentinel with auth-pass (the
    admin); the product's users reach the master and a replica through the Sentinel, and
    after a failover the writer writes to the promoted replica."""
    (tmp_path / "users.acl").write_text(acl_file(acl_server.settings(), admin_password=ADMIN))
    master, replica, sentinel_port = free_port(), free_port(), free_port()
    acl = ["--aclfile", str(tmp_path / "users.acl"), "--masterauth", ADMIN]
    procs = [_start(tmp_path, master, acl)]
    try:
        procs.append(_start(tmp_path, replica, [*acl, "--replicaof", "127.0.0.1", str(master)]))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor fpacl 127.0.0.1 {master} 1\n"
            "sentinel down-after-milliseconds fpacl 1000\n"
            f"sentinel auth-pass fpacl {ADMIN}\n"
        )
        with (tmp_path / "sentinel.log").open("wb") as log:
            procs.append(
                subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=log, stderr=log)
            )
        s = acl_server.settings(
            FLEETPULSE_REDIS_SENTINELS=f"127.0.0.1:{sentinel_port}",
            FLEETPULSE_REDIS_SENTINEL_MASTER="fpacl",
            FLEETPULSE_REDIS_READ_FROM_REPLICAS="true",
        )
        sentinel = redis.Redis(port=sentinel_port)
        replica_admin = redis.Redis(port=replica, password=ADMIN)
        deadline = time.monotonic() + 30
        while True:
            # The Sentinel promotes only a replica whose link it saw up in the replica's
            # INFO, which it reads every 10 s; an INFO from before the sync says the link
            # has been down since the epoch, and FAILOVER answers NOGOODSLAVE until the next.
            try:
                views = sentinel.sentinel_slaves("fpacl")
                if any(
                    v.get("master-link-status") == "ok" and v.get("master-link-down-time") == 0
                    for v in views
                ):
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "sentinel.log").read_text()[-800:]
            time.sleep(0.1)
        writer = connect(s)
        RedisStateWriter(writer, s).write([live("amr-9", 1)], [], [])
        _noperm(lambda: writer.flushall())
        reader = connect_reader(s)
        deadline = time.monotonic() + 10
        while RedisStateReader(reader, s).get("amr-9") is None:  # from the replica
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _noperm(lambda: reader.delete(f"{s.redis_prefix}:summary"))
        sentinel.execute_command("SENTINEL", "FAILOVER", "fpacl")
        deadline = time.monotonic() + 30
        while sentinel.sentinel_get_master_addr_by_name("fpacl")[1] != replica:
            assert time.monotonic() < deadline, (tmp_path / "sentinel.log").read_text()[-800:]
            time.sleep(0.1)
        old_master = redis.Redis(port=master, password=ADMIN)
        while old_master.info("replication")["role"] != "slave":  # demoted: no lost write
            assert time.monotonic() < deadline, (tmp_path / "sentinel.log").read_text()[-800:]
            time.sleep(0.1)
        old_master.close()
        applied = 0
        deadline = time.monotonic() + 30
        while not applied:  # the writer's pool follows the Sentinel to the new master
            try:
                applied = RedisStateWriter(writer, s).write([live("amr-9", 2)], [], []).applied
            except (redis.ConnectionError, redis.exceptions.ReadOnlyError):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert replica_admin.info("replication")["role"] == "master"
        assert replica_admin.hget(f"{s.redis_prefix}:robot:{{amr-9}}", "seq") == b"2"
        for client in (writer, reader, sentinel, replica_admin):
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_the_main_job_runs_as_default_when_the_running_redis_lacks_the_users(
    acl_server: AclServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = load_settings(
        {"FLEETPULSE_STACK_DIR": str(tmp_path), "FLEETPULSE_REDIS_PORT": str(acl_server.port)}
    )
    assert _redis_users(Stack(base), base) == ({}, {})  # no users file: nothing to use
    RedisUsers.kept(tmp_path / "redis-users.json")  # made, but this server has not got them
    assert _redis_users(Stack(base), base) == ({}, {})
    out = capsys.readouterr().out
    assert "the stack's ACL users cannot serve this job" in out and "stack-down" in out
    assert "runs as Redis' default user" in out


def test_the_main_job_on_another_key_prefix_runs_as_default(
    acl_server: AclServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stack's users cover its own key prefix only; a job on another prefix (as the
    tests run the main job) would be refused every key, so it runs as the default user."""
    base = load_settings(
        {"FLEETPULSE_STACK_DIR": str(tmp_path), "FLEETPULSE_REDIS_PORT": str(acl_server.port)}
    )
    s = acl_server.settings()
    # The server's users, kept where the stack keeps them, for the server's own prefix:
    kept = RedisUsers(
        s.redis_username, s.redis_password, s.redis_api_username, s.redis_api_password
    )
    (tmp_path / "redis-users.json").write_text(json.dumps(kept._asdict()))
    same = msgspec.structs.replace(base, redis_prefix=s.redis_prefix)
    writer, reader = _redis_users(Stack(same), same)
    assert writer and reader  # its own prefix: the users serve it
    other = msgspec.structs.replace(base, redis_prefix="elsewhere")
    assert _redis_users(Stack(other), other) == ({}, {})
    out = capsys.readouterr().out
    assert "another key prefix" in out and "FLEETPULSE_REDIS_PREFIX='elsewhere'" in out
