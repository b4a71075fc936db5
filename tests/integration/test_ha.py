"""High availability on one machine, with figures: the HA stack (3 KRaft brokers, Redis
master + replica + 3 Sentinels) started here on ports of its own, the product on it
through HTTP (granian ingest server, the dataflow as the main job's 2 processes), and
faults injected under steady load:

* a broker leading most partitions killed with SIGKILL, then brought back;
* a slow broker (SIGSTOP for a few seconds, then SIGCONT);
* the active KRaft controller killed;
* the Redis master killed (Sentinel promotes the replica), and Redis emptied.

Each broker fault checks that every report answered 202 is in Redis (live state and
history), that refusals were 503 (never another error), and that the dataflow rode
through without a restart. Figures (seconds with 503s, p99 freshness during the event,
reports lost) go to ``HA_FIGURES_DIR`` (default ``<stack>/figures``), which
``just ha-figures`` renders into docs/ha.md.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
from confluent_kafka.admin import AdminClient

from api.auth import hash_token, new_token
from deploy.local.harness import (
    MADE_PREFIXES,
    MADE_TOPICS,
    FlowProcess,
    isolated,
    metric_total,
    report,
    stop_group,
    wait_until,
)
from deploy.local.procs import free_port, wait_http_ready
from deploy.local.services import Kafka, quorum_leader
from deploy.local.stack import Stack
from fleetpulse.errors import StackError
from fleetpulse.settings import Settings, load_settings, to_env
from state.connect import connect, connect_reader
from state.projection import Projection
from state.reader import RedisStateReader
from tests.integration.rig import all_robots

# Ports of the HA stack under test (the layout adds +10/+20, +1, +11..13 to these),
# not the defaults (29092.., 56379..) so a developer's HA stack may run meanwhile; the
# brokers below the ephemeral range like the defaults (README, "High availability").
KAFKA_PORT, CONTROLLER_PORT, REDIS_PORT = 29192, 29193, 26479
# The load: robots, and reports/s through HTTP for all of them together; HA_ROBOTS and
# HA_RATE raise it for a figures run (`HA_ROBOTS=2000 HA_RATE=1000 just ha-figures`).
ROBOTS = int(os.environ.get("HA_ROBOTS") or 60)
RATE = float(os.environ.get("HA_RATE") or 120.0)
REDIS_RATE = RATE * 2 / 3
PRODUCE_TIMEOUT_S = 3.0  # ingest's bound before 503 (FLEETPULSE_PRODUCE_TIMEOUT_S)

pytestmark = pytest.mark.ha


@pytest.fixture(scope="module")
def ha(
    stack: Stack, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The HA stack without Jaeger (the tests' spans go to the shared stack's)."""
    root = tmp_path_factory.mktemp("ha-stack")
    own = msgspec.structs.replace(
        settings,
        stack_dir=str(root),
        ha_kafka_port=KAFKA_PORT,
        ha_kafka_controller_port=CONTROLLER_PORT,
        redis_port=REDIS_PORT,
        kafka_heap_mb=768,
        kafka_bootstrap=None,
        redis_url=None,
        redis_sentinels="",
        sentinel_down_after_ms=1000,
        sentinel_failover_timeout_ms=3000,
    )
    ha = Stack(own, ha=True)
    jars = Kafka(settings, stack.root).libs
    (ha.root / "kafka").mkdir(parents=True)
    (ha.root / "kafka" / jars.name).symlink_to(jars)
    nodes = [svc.name for svc in ha.services if svc.kind != "jaeger"]
    try:
        ha.up(nodes)
    except StackError as exc:
        pytest.fail(f"the HA stack could not start:\n{exc}", pytrace=False)
    yield ha
    ha.down()


def whole(ha: Stack) -> None:
    """Every node up again (a test may have killed one), and a master elected."""
    try:
        ha.up([svc.name for svc in ha.services if svc.kind != "jaeger"])
    except StackError as exc:
        pytest.fail(f"the HA stack could not be made whole:\n{exc}", pytrace=False)


def product(ha: Stack, settings: Settings, tmp: Path) -> Settings:
    """The product's settings on the HA stack (made whole first): every broker, 3 copies,
    Sentinel; topics and a Redis prefix of its own, the flow's metrics on a free port."""
    whole(ha)
    base = load_settings({**to_env(ha.settings), **ha.client_env()})
    assert base.kafka_replication == 3 and base.redis_sentinels
    s = isolated(
        base,
        tmp,
        partitions=12,
        history_len=1000,
        produce_timeout_s=PRODUCE_TIMEOUT_S,
        otlp_endpoint=settings.otlp_endpoint,
        dataflow_metrics_port=free_port(2),  # process 1 on the next port
    )
    # They live on the HA stack, which goes at the end: not the shared stack's to clean.
    for made in (s.topic_reports, s.topic_dlq, s.topic_alerts, s.topic_incidents):
        MADE_TOPICS.remove(made)
    MADE_PREFIXES.remove(s.redis_prefix)
    return s


def run_product(s: Settings, tmp: Path) -> tuple[FlowProcess, Server]:
    """The dataflow as the main job's 2 processes, and the ingest server."""
    return FlowProcess(s, tmp / "flow.log", processes=2), Server(s, "ingest", tmp / "ingest.log")


def flow_metrics(s: Settings) -> list[int]:
    """The /metrics ports of the flow's 2 processes."""
    return [s.dataflow_metrics_port, s.dataflow_metrics_port + 1]


class Server:
    """An API server (granian, as users run it) on a port of its own: ingest or query."""

    def __init__(self, s: Settings, role: str, log: Path) -> None:
        self.token = new_token()
        self.port = free_port()
        scope = "ingest" if role == "ingest" else "read"
        env = {
            **os.environ,
            **to_env(s),
            f"FLEETPULSE_{role.upper()}_PORT": str(self.port),
            "FLEETPULSE_API_TOKENS": f"{scope}:{hash_token(self.token)}",
        }
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.serve", role],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_http_ready(f"http://127.0.0.1:{self.port}/readyz", self.proc, 60, log)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGTERM)
        self._log.close()


class Load:
    """Robots posting single reports over HTTP at a steady total rate (threads with
    keep-alive clients), each robot's seq going up by one per post; records every
    answer: 202s by robot, 503s by time, anything else as a failure."""

    def __init__(self, ingest: Server, robots: int = ROBOTS, rate: float = RATE) -> None:
        self.url = f"http://127.0.0.1:{ingest.port}/v1/reports"
        self.headers = {"Authorization": f"Bearer {ingest.token}"}
        self.robots = [f"amr-ha-{i:03d}" for i in range(robots)]
        self.rate = rate
        self.accepted: dict[str, list[int]] = {r: [] for r in self.robots}
        self.sent: dict[str, int] = dict.fromkeys(self.robots, 0)
        self.refused: list[float] = []  # wall-clock times of 503s
        self.failed: list[str] = []
        self._stop = threading.Event()
        threads = max(6, round(rate / 60))
        self._threads = [
            threading.Thread(target=self._run, args=(self.robots[i::threads], threads), daemon=True)
            for i in range(threads)
        ]

    def _run(self, robots: list[str], threads: int) -> None:
        every = threads / self.rate  # this thread's share of the rate
        with httpx.Client(timeout=PRODUCE_TIMEOUT_S + 10, headers=self.headers) as client:
            due = time.monotonic()
            while not self._stop.is_set():
                for robot in robots:
                    if self._stop.is_set():
                        return
                    seq = self.sent[robot] + 1
                    self.sent[robot] = seq
                    try:
                        r = client.post(self.url, json=report(robot, seq))
                    except httpx.HTTPError as exc:
                        self.failed.append(f"{robot}/{seq}: {exc!r}")
                        continue
                    if r.status_code == 202:
                        self.accepted[robot].append(seq)
                    elif r.status_code == 503:
                        self.refused.append(time.time())
                    else:
                        self.failed.append(f"{robot}/{seq}: {r.status_code} {r.text[:200]}")
                    due += every
                    time.sleep(max(0.0, due - time.monotonic()))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(PRODUCE_TIMEOUT_S + 15)

    def total_accepted(self) -> int:
        return sum(len(v) for v in self.accepted.values())


def freshness_buckets(ports: list[int]) -> dict[float, float]:
    """The flow processes' freshness histogram, summed: upper bound -> cumulative count."""
    total: Counter[float] = Counter()
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("fleetpulse_flow_freshness_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                total[float(le)] += float(line.rsplit(" ", 1)[1])
    return dict(total)


def p99(before: dict[float, float], after: dict[float, float]) -> float:
    """The 99th percentile (a bucket's upper bound) of what was observed in between."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    count = delta.get(float("inf"), 0.0)
    assert count > 0, "no freshness observed during the event"
    for le in sorted(delta):
        if delta[le] >= 0.99 * count:
            return le
    return float("inf")


def record(name: str, ha: Stack, figures: dict[str, Any]) -> None:
    """Write one fault test's figures for the figures page (docs/ha.md)."""
    folder = Path(os.environ.get("HA_FIGURES_DIR") or ha.root.parent / "figures")
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "test": name,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "robots": ROBOTS,
        **figures,
    }
    file = name
    if (ROBOTS, RATE) != (60, 120.0):  # a heavier run keeps the default run's figures
        figures["test"] = f"{name} ({ROBOTS} robots, {RATE:g} reports per s)"
        file = f"{name}-{ROBOTS}x{RATE:g}"
    (folder / f"{file}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{file}: {json.dumps(figures)}")


_ADMINS: dict[str, AdminClient] = {}


def _admin(s: Settings) -> AdminClient:
    """One admin client per cluster for the whole module (polling with new ones would
    open connections to every broker several times a second)."""
    bootstrap = s.kafka_bootstrap_servers
    if bootstrap not in _ADMINS:
        _ADMINS[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
    return _ADMINS[bootstrap]


def _leader_counts(s: Settings) -> Counter[int]:
    meta = _admin(s).list_topics(s.topic_reports, timeout=10).topics[s.topic_reports]
    return Counter(p.leader for p in meta.partitions.values())


def leader_of_most(s: Settings) -> int:
    """The broker id leading most partitions of the reports topic."""
    return _leader_counts(s).most_common(1)[0][0]


def _leads_nothing(s: Settings, victim: int) -> bool:
    time.sleep(0.4)  # wait_until's 0.1 s is too often for a metadata request
    return victim not in _leader_counts(s)


def check_nothing_acknowledged_lost(s: Settings, load: Load, flow: FlowProcess) -> int:
    """Wait until every robot's live state is at or past its newest 202, then count the
    202-acknowledged reports missing from Redis (live state or history): must be 0."""
    reader = RedisStateReader(connect_reader(s), s)

    def caught_up() -> bool:
        for robot, seqs in load.accepted.items():
            st = reader.get(robot)
            if seqs and (st is None or st.report.seq < seqs[-1]):
                return False
        return True

    wait_until("every acknowledged report applied", caught_up, 90, [flow])
    lost = 0
    for robot, seqs in load.accepted.items():
        live = reader.get(robot)
        assert live is not None
        # Its newest is one this robot sent (a 503'd report may have been stored too).
        assert live.report.seq <= load.sent[robot]
        kept = {r.seq for r in reader.history(robot, limit=1000)}
        lost += len(set(seqs) - kept)
    return lost


def _refused_between(load: Load, start: float, end: float) -> int:
    return sum(start <= t <= end for t in load.refused)


def broker_fault(
    name: str,
    ha: Stack,
    settings: Settings,
    tmp_path: Path,
    fault: Any,
) -> None:
    """Steady HTTP load; ``fault(s)`` injects the fault (and undoes it) while it runs."""
    s = product(ha, settings, tmp_path)
    flow, ingest = run_product(s, tmp_path)
    try:
        with Load(ingest) as load:
            reader = RedisStateReader(connect_reader(s), s)
            wait_until("every robot in Redis", lambda: reader.summary().total == ROBOTS, 90, [flow])
            time.sleep(2)
            before = freshness_buckets(flow_metrics(s))
            accepted_before = load.total_accepted()
            started = time.time()
            what = fault(s)
            ended = time.time()
            time.sleep(3)  # steady again
            after = freshness_buckets(flow_metrics(s))
        assert flow.alive(), f"the dataflow exited during the fault:\n{flow.output()}"
        assert not load.failed, f"answers other than 202/503: {load.failed[:5]}"
        lost = check_nothing_acknowledged_lost(s, load, flow)
        assert flow.alive(), "the dataflow restarted"
        assert lost == 0, f"{lost} acknowledged reports are not in Redis"
        seconds_503 = len({int(t) for t in load.refused})
        record(
            name,
            ha,
            {
                **what,
                "rate_per_s": RATE,
                "fault_seconds": round(ended - started, 1),
                "accepted_during": load.total_accepted() - accepted_before,
                # What the load reached: a request bound to a partition whose leader is
                # away waits up to the produce timeout, and a thread posts one at a time.
                "answered_per_s": round(
                    (
                        load.total_accepted()
                        - accepted_before
                        + _refused_between(load, started, ended)
                    )
                    / max(ended - started, 0.001),
                    1,
                ),
                "refused_503": len(load.refused),
                "seconds_with_503": seconds_503,
                "freshness_p99_s": p99(before, after),
                "lost": lost,
                "dataflow_restarts": 0,
            },
        )
    finally:
        ingest.stop()
        flow.stop()
        whole(ha)


def test_ha_stack_layout(ha: Stack) -> None:
    """3 brokers with one quorum, topics RF 3 / min ISR 2, Sentinels ready for a failover."""
    rows = {row.name: row for row in ha.status()}
    assert [n for n, r in rows.items() if not r.healthy] == ["jaeger"]  # not started here
    kafka = [svc for svc in ha.services if isinstance(svc, Kafka)]
    assert [k.node for k in kafka] == [1, 2, 3]
    config = kafka[0].config_path.read_text()
    voters = f"1@127.0.0.1:{CONTROLLER_PORT},2@127.0.0.1:{CONTROLLER_PORT + 10},3@127.0.0.1:{CONTROLLER_PORT + 20}"
    for k in kafka:
        text = k.config_path.read_text()
        assert f"node.id={k.node}\n" in text
        assert f"controller.quorum.voters={voters}\n" in text
        assert "min.insync.replicas=2\n" in text and "default.replication.factor=3\n" in text
        assert "unclean.leader.election.enable=false\n" in text
        assert "offsets.topic.replication.factor=3\n" in text
    # One cluster id on all three nodes.
    ids = {
        line
        for k in kafka
        for line in (k.data_dir / "meta.properties").read_text().splitlines()
        if line.startswith("cluster.id=")
    }
    assert len(ids) == 1
    assert quorum_leader(ha.root) in (1, 2, 3)
    admin = AdminClient({"bootstrap.servers": ha.client_env()["FLEETPULSE_KAFKA_BOOTSTRAP"]})
    meta = admin.list_topics(ha.settings.topic_reports, timeout=10)
    assert sorted(meta.brokers) == [1, 2, 3]
    parts = meta.topics[ha.settings.topic_reports].partitions.values()
    assert all(len(p.replicas) == 3 and len(p.isrs) == 3 for p in parts)
    assert "replica(s)" in rows["redis"].role and "master" in rows["redis"].role
    assert rows["redis-replica"].role == f"replica of 127.0.0.1:{REDIS_PORT}"
    for n in (1, 2, 3):
        assert rows[f"sentinel-{n}"].role == f"master is 127.0.0.1:{REDIS_PORT}"
    assert config.count("\n") > 10


def test_broker_leading_most_partitions_killed(
    ha: Stack, settings: Settings, tmp_path: Path
) -> None:
    def fault(s: Settings) -> dict[str, Any]:
        victim = leader_of_most(s)
        svc = ha.service(f"kafka-{victim}")
        pid = ha.pidfile(svc).running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # Its partitions move once the controller fences it (broker.session.timeout.ms).
        wait_until("the partitions led elsewhere", lambda: _leads_nothing(s, victim), 60)
        moved = time.monotonic() - killed
        time.sleep(5)  # ingest keeps going on the other two
        ha.up([svc.name])
        return {
            "fault": f"kill -9 kafka-{victim} (leader of most partitions), back after "
            f"{moved + 5:.0f} s",
            "leaders_moved_s": round(moved, 1),
        }

    broker_fault("broker-kill", ha, settings, tmp_path, fault)


def test_slow_broker_paused(ha: Stack, settings: Settings, tmp_path: Path) -> None:
    def fault(s: Settings) -> dict[str, Any]:
        victim = leader_of_most(s)
        pid = ha.pidfile(ha.service(f"kafka-{victim}")).running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(6)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(4)
        return {"fault": f"SIGSTOP kafka-{victim} (leader of most partitions) for 6 s"}

    broker_fault("broker-pause", ha, settings, tmp_path, fault)


def test_active_controller_killed(ha: Stack, settings: Settings, tmp_path: Path) -> None:
    def fault(s: Settings) -> dict[str, Any]:
        victim = quorum_leader(ha.root)
        assert victim is not None
        svc = ha.service(f"kafka-{victim}")
        pid = ha.pidfile(svc).running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        new = wait_until(
            "a new active controller",
            lambda: (quorum_leader(ha.root) or victim) != victim and quorum_leader(ha.root),
            30,
        )
        elected = time.monotonic() - killed
        time.sleep(max(0.0, 8 - elected))
        ha.up([svc.name])
        return {
            "fault": f"kill -9 kafka-{victim} (the active controller), back after 8 s",
            "new_controller": new,
            "controller_elected_s": round(elected, 1),
        }

    broker_fault("controller-kill", ha, settings, tmp_path, fault)


def summary_matches_listing(reader: RedisStateReader) -> None:
    robots = all_robots(reader)
    summary = reader.summary()
    assert summary.total == len(robots)
    assert summary.online == sum(r.online for r in robots)
    counted = {status: n for status, n in summary.by_status.items() if n}
    assert counted == dict(Counter(r.report.status for r in robots))


def test_redis_master_killed_and_redis_emptied_the_projection_converges(
    ha: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = product(ha, settings, tmp_path)
    flow, ingest = run_product(s, tmp_path)
    query = Server(s, "query", tmp_path / "query.log")
    master = connect(s)
    projection = Projection(master, s.redis_prefix)
    reader = RedisStateReader(connect_reader(s), s)

    def converged(load: Load) -> bool:
        for robot in load.robots:
            st = reader.get(robot)
            if st is None or st.report.seq != load.sent[robot]:
                return False
        return True

    try:
        with Load(ingest, rate=REDIS_RATE) as load:
            wait_until("every robot in Redis", lambda: reader.summary().total == ROBOTS, 90, [flow])
            wait_until("the first publish recorded", lambda: projection.published_to(), 30, [flow])
            first = projection.server()
            assert projection.published_to() == first

            # 1. kill -9 the master: Sentinel promotes the replica, the flow finds another
            # server (run_id) and re-publishes; writes resume there.
            pid = ha.pidfile(ha.service("redis")).running_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(
                "the projection published to the promoted replica",
                lambda: _published_elsewhere(projection, first),
                60,
                [flow],
            )
            failover_s = time.monotonic() - killed
            time.sleep(2)
        assert not load.failed and not load.refused  # ingest never needs Redis
        wait_until("Redis equals what was sent", lambda: converged(load), 60, [flow])
        summary_matches_listing(reader)
        # The query API found the new master through the Sentinels too.
        answer = query.get("/v1/fleet/summary")
        assert answer.status_code == 200, answer.text
        assert answer.json()["total"] == ROBOTS
        robot = query.get(f"/v1/robots/{load.robots[0]}")
        assert (
            robot.status_code == 200 and robot.json()["report"]["seq"] == load.sent[load.robots[0]]
        )
        promoted = projection.server()
        assert promoted != first
        claimed = metric_total(
            flow_metrics(s), 'fleetpulse_flow_republishes_total{event="claimed"} '
        )
        assert claimed >= 2  # the first start, and the failover

        # 2. an empty Redis (a restart without persistence): every robot comes back,
        # counters and indexes with it. No load now: what Redis must hold is fixed.
        master.flushall()
        emptied = time.monotonic()
        wait_until("Redis equals what was sent", lambda: converged(load), 60, [flow])
        empty_s = time.monotonic() - emptied
        summary_matches_listing(reader)
        assert reader.summary().total == ROBOTS

        # 3. on demand: `just rebuild-state` asks the flow and waits for it.
        done = subprocess.run(
            [sys.executable, "-m", "dataflows.republish", "--timeout", "60"],
            env={**os.environ, **to_env(s)},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"done: Redis {promoted[:12]} holds the flow's live state" in done.stdout
        assert converged(load)
        summary_matches_listing(reader)
        assert flow.alive()
        record(
            "redis-failover",
            ha,
            {
                "fault": "kill -9 the Redis master (Sentinel down-after 1000 ms), then FLUSHALL",
                "rate_per_s": REDIS_RATE,
                "failover_to_republished_s": round(failover_s, 1),
                "flushall_to_converged_s": round(empty_s, 1),
                "rebuild_state_exit": done.returncode,
                "lost_live_states": 0,
            },
        )
    finally:
        query.stop()
        ingest.stop()
        flow.stop()
        whole(ha)


def _published_elsewhere(projection: Projection, first: str) -> bool:
    try:
        server = projection.server()
        return server != first and projection.published_to() == server
    except redis.RedisError:
        return False
