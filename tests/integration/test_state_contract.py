"""One contract suite for the state store, run over every backend behind its protocols.

Like Quix Streams' state tests, :class:`TestStateContract` only talks to a
``StateWriter`` and a ``StateReader``; the ``store`` fixture supplies them per
backend: the local stack's Redis through a URL, and a private Sentinel group
(master, replica, sentinel started here as ``redis-server`` processes); the query
routes' asyncio reader runs the same suite on the URL backend (through
:class:`AwaitedReader`). Each test gets its own key prefix and deletes its keys
afterwards. Expected values come from
:class:`Model`, a few lines of plain Python that state the contract.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import state.reads
import state.writer
from deploy.local.procs import free_port
from fleetpulse.errors import ConfigError
from fleetpulse.schema import (
    STATUSES,
    Alert,
    AlertKind,
    LiveState,
    Pose,
    RobotReport,
    Status,
    WindowStats,
)
from fleetpulse.settings import Settings
from state import (
    AlertRaised,
    AsyncRedisStateReader,
    ChangeEvent,
    FleetSummary,
    Keys,
    RedisStateReader,
    RedisStateWriter,
    RobotRetired,
    StateChanged,
    StateReader,
    StateWriter,
    close_async,
    connect,
    connect_reader,
    connect_reader_async,
    decode_change,
)
from state.keys import from_epoch_us
from state.writer import version

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SITES = ["north", "south", "dock.7", "Yard", None]


# --- builders ---------------------------------------------------------------------------
def live(
    robot_id: str,
    seq: int,
    *,
    boot: int = 0,
    status: Status = "idle",
    battery: float = 50.0,
    site: str | None = "north",
    online: bool = True,
    updated: float | None = None,
) -> LiveState:
    """A live state; ``updated`` (the change's arrival clock) follows the order, and an
    offline mark comes half a second after the report it keeps."""
    report = RobotReport(
        robot_id=robot_id,
        boot=boot,
        seq=seq,
        ts=T0 + timedelta(seconds=boot * 1000 + seq),
        status=status,
        battery=battery,
        pose=Pose(x=float(seq), y=0.5, theta=0.1),
        site=site,
    )
    arrived = 1.7e9 + boot * 1000 + seq
    return LiveState(
        report=report,
        last_seen=arrived,
        online=online,
        status_since=report.ts,
        updated=updated if updated is not None else arrived + (0.0 if online else 0.5),
    )


def window(robot_id: str, minute: int, *, count: int = 10) -> WindowStats:
    start = T0 + timedelta(minutes=minute)
    return WindowStats(
        robot_id=robot_id,
        window_start=start,
        window_end=start + timedelta(minutes=1),
        count=count,
        battery_min=40.0,
        battery_avg=45.5,
        battery_max=50.0,
        distance_m=12.25,
        max_speed=1.5,
        error_count=0,
    )


def alert(robot_id: str, kind: AlertKind, seq: int) -> Alert:
    return Alert(
        id=f"{robot_id}:{kind}:0:{seq}",
        robot_id=robot_id,
        kind=kind,
        boot=0,
        seq=seq,
        at=T0 + timedelta(seconds=seq),
        detail=f"seq {seq}",
    )


# --- the contract in plain Python ---------------------------------------------------------
@dataclass
class Model:
    """What the store must hold after a sequence of writes."""

    history_len: int = 100
    states: dict[str, LiveState] = field(default_factory=dict)
    history: dict[str, list[RobotReport]] = field(default_factory=dict)
    alert_ids: set[str] = field(default_factory=set)
    events: list[ChangeEvent] = field(default_factory=list)

    def write(self, states: Sequence[LiveState], alerts: Sequence[Alert] = ()) -> None:
        for s in states:
            rid, old = s.report.robot_id, self.states.get(s.report.robot_id)
            # The writer's rule: a state applies iff its version is greater; its report
            # enters the history iff its order (resets, boot, seq) is.
            if old is None or version(s) > version(old):
                self.states[rid] = s
                self.events.append(StateChanged(state=s))
                if old is None or version(s)[:3] > version(old)[:3]:
                    self.history[rid] = [s.report, *self.history.get(rid, [])][: self.history_len]
        for a in alerts:
            if a.id not in self.alert_ids:
                self.alert_ids.add(a.id)
                self.events.append(AlertRaised(alert=a))


def summary_of(states: Sequence[LiveState], low_pct: float) -> FleetSummary:
    """The fleet summary computed from a list of live states."""
    by_site: dict[str, int] = {}
    by_site_status: dict[str, dict[Any, int]] = {}
    for s in states:
        if s.report.site is not None:
            by_site[s.report.site] = by_site.get(s.report.site, 0) + 1
            per = by_site_status.setdefault(s.report.site, {})
            per[s.report.status] = per.get(s.report.status, 0) + 1
    online = sum(s.online for s in states)
    return FleetSummary(
        total=len(states),
        online=online,
        offline=len(states) - online,
        low_battery=sum(s.report.battery <= low_pct for s in states),
        by_status={x: sum(s.report.status == x for s in states) for x in STATUSES},
        by_site=dict(sorted(by_site.items())),
        by_site_status=dict(sorted(by_site_status.items())),
    )


def random_workload(seed: int, robots: int = 200) -> list[list[LiveState]]:
    """Several versions of each robot (distinct (boot, seq)), shuffled into batches."""
    rng = random.Random(seed)
    versions: list[LiveState] = []
    for i in range(robots):
        rid = rng.choice(["amr-{}", "agv.{}", "X:{}", "b_{}"]).format(i)  # lex != numeric order
        orders = rng.sample([(b, q) for b in range(3) for q in range(20)], rng.randint(1, 4))
        for boot, seq in orders:
            battery = rng.choice([round(rng.uniform(0, 100), 1), 20.0, 0.0, 100.0, 19.9])
            versions.append(
                live(
                    rid,
                    seq,
                    boot=boot,
                    status=rng.choice(STATUSES),
                    battery=battery,
                    site=rng.choice(SITES),
                    online=rng.random() < 0.7,
                )
            )
    rng.shuffle(versions)
    batches, i = [], 0
    while i < len(versions):
        n = rng.randint(1, 60)
        batches.append(versions[i : i + n])
        i += n
    return batches


def list_all(reader: StateReader, limit: int, **filters: Any) -> list[LiveState]:
    """Every robot matching ``filters``, by following the cursor to the end."""
    out: list[LiveState] = []
    cursor: str | None = None
    for _ in range(10_000):
        page, cursor = reader.list_robots(**filters, cursor=cursor, limit=limit)
        assert len(page) <= limit
        out += page
        if cursor is None:
            return out
    raise AssertionError("list_robots never returned a final page")


def read_changes(reader: StateReader, after: str | None, count: int) -> list[tuple[str, bytes]]:
    """All change-stream entries after ``after``, read ``count`` at a time."""
    out: list[tuple[str, bytes]] = []
    while page := reader.changes(after, count):
        assert len(page) <= count
        out += page
        after = page[-1][0]
    return out


# --- backends ---------------------------------------------------------------------------
def _dump(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Every key under the prefix with its whole value, read by type."""
    out: dict[str, Any] = {}
    for key in sorted(client.scan_iter(match=keys.pattern(), count=1000)):
        kind = client.type(key).decode()
        readers: dict[str, Callable[[], Any]] = {
            "hash": lambda k=key: client.hgetall(k),
            "list": lambda k=key: client.lrange(k, 0, -1),
            "zset": lambda k=key: client.zrange(k, 0, -1, withscores=True),
            "stream": lambda k=key: client.xrange(k),
            "string": lambda k=key: client.get(k),
            "set": lambda k=key: sorted(client.smembers(k)),
        }
        out[key.decode()] = (kind, readers[kind]())
    return out


@dataclass
class Store:
    writer: StateWriter
    reader: StateReader
    settings: Settings
    dump: Callable[[], dict[str, Any]]


@dataclass
class SentinelGroup:
    master_port: int
    replica_port: int
    sentinel_port: int

    def settings(self, base: Settings, **overrides: Any) -> Settings:
        return msgspec.structs.replace(
            base,
            redis_url=f"redis://127.0.0.1:{self.master_port}/0",  # only db/password are used
            redis_sentinels=f"127.0.0.1:{self.sentinel_port}",
            redis_sentinel_master="fptest",
            **overrides,
        )


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, a replica and one sentinel (quorum 1), private to this module."""
    root: Path = tmp_path_factory.mktemp("sentinel")
    group = SentinelGroup(free_port(), free_port(), free_port())
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
    conf = root / "sentinel.conf"
    conf.write_text(
        f"port {group.sentinel_port}\nbind 127.0.0.1\ndir {root}\n"
        f"sentinel monitor fptest 127.0.0.1 {group.master_port} 1\n"
        "sentinel down-after-milliseconds fptest 5000\n"
    )
    commands = [
        ["redis-server", "--port", str(group.master_port), *common],
        [
            "redis-server",
            "--port",
            str(group.replica_port),
            *common,
            "--replicaof",
            "127.0.0.1",
            str(group.master_port),
        ],
        ["redis-server", str(conf), "--sentinel"],
    ]
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i, cmd in enumerate(commands):
            log = (root / f"{i}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        sentinel = redis.Redis(port=group.sentinel_port)
        replica = redis.Redis(port=group.replica_port)
        deadline = time.monotonic() + 30
        while True:
            try:
                known = sentinel.execute_command("SENTINEL", "REPLICAS", "fptest")
                linked = replica.info("replication").get("master_link_status") == "up"
                if known and linked:
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                tails = "\n".join((root / f"{i}.log").read_text()[-800:] for i in range(3))
                pytest.fail(f"the sentinel group did not come up:\n{tails}", pytrace=False)
            time.sleep(0.1)
        sentinel.close()
        replica.close()
        yield group
    finally:
        for proc in procs:  # only the processes started above
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


class AwaitedReader:
    """An :class:`AsyncRedisStateReader` behind the blocking :class:`StateReader` calls:
    each read is awaited on this reader's own event loop; the change stream (which the
    async reader does not serve) is the blocking reader's."""

    def __init__(self, settings: Settings, blocking: RedisStateReader) -> None:
        self.runner = asyncio.Runner()
        self.client = connect_reader_async(settings)
        self.reader = AsyncRedisStateReader(self.client, settings, blocking)
        self.blocking = blocking

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.reader, name, None)
        if method is None or not inspect.iscoroutinefunction(method):
            return getattr(self.blocking, name)
        return lambda *args, **kwargs: self.runner.run(method(*args, **kwargs))

    def close(self) -> None:
        self.runner.run(close_async(self.client))
        self.runner.close()


@pytest.fixture(params=["redis-url", "redis-sentinel", "redis-url-asyncio"])
def make_store(
    request: pytest.FixtureRequest, stack: object, settings: Settings
) -> Iterator[Callable[..., Store]]:
    """Make stores with their own key prefix (and settings overrides) on one backend."""
    made: list[tuple[redis.Redis, redis.Redis, Keys]] = []
    awaited: list[AwaitedReader] = []

    def make(**overrides: Any) -> Store:
        prefix = f"t{uuid.uuid4().hex[:20]}"
        if request.param == "redis-sentinel":
            group: SentinelGroup = request.getfixturevalue("sentinel_group")
            s = group.settings(settings, redis_prefix=prefix, **overrides)
        else:
            s = msgspec.structs.replace(settings, redis_prefix=prefix, **overrides)
        write_client, read_client = connect(s), connect_reader(s)
        keys = Keys(prefix)
        made.append((write_client, read_client, keys))
        reader: StateReader = RedisStateReader(read_client, s)
        if request.param.endswith("-asyncio"):
            awaited.append(AwaitedReader(s, RedisStateReader(read_client, s)))
            reader = awaited[-1]  # type: ignore[assignment]
        return Store(
            writer=RedisStateWriter(write_client, s, max_per_call=50),
            reader=reader,
            settings=s,
            dump=lambda: _dump(write_client, keys),
        )

    yield make
    for each in awaited:
        each.close()
    for write_client, read_client, keys in made:
        for key in write_client.scan_iter(match=keys.pattern(), count=1000):
            write_client.delete(key)
        assert not list(write_client.scan_iter(match=keys.pattern()))
        write_client.close()
        read_client.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store()


# --- the suite ------------------------------------------------------------------------------
class TestStateContract:
    def test_unknown_robot_and_empty_fleet(self, store: Store) -> None:
        assert store.reader.get("nobody") is None
        assert store.reader.history("nobody") == []
        assert store.reader.stats("nobody") == []
        assert store.reader.alerts(robot_id="nobody") == []
        assert store.reader.list_robots() == ([], None)
        assert store.reader.summary() == summary_of([], store.settings.low_battery_pct)
        assert store.reader.changes(None, 10) == []
        assert store.reader.latest_change_id() == "0-0"

    def test_newest_wins_and_history_holds_each_applied_report_once(self, store: Store) -> None:
        w, r = store.writer, store.reader
        res = w.write([live("amr-7", 5)], [], [])
        assert (res.states_applied, res.states_ignored) == (1, 0)
        res = w.write([live("amr-7", 3, status="error")], [], [])
        assert (res.states_applied, res.states_ignored) == (0, 1)
        assert r.get("amr-7") == live("amr-7", 5)
        # A later boot beats any seq of an earlier one; one batch, any order.
        res = w.write([live("amr-7", 7), live("amr-7", 2, boot=1), live("amr-7", 99)], [], [])
        assert (res.states_applied, res.states_ignored) == (2, 1)
        assert r.get("amr-7") == live("amr-7", 2, boot=1)
        assert [h.order for h in r.history("amr-7")] == [(1, 2), (0, 7), (0, 5)]
        assert r.history("amr-7", limit=2) == [
            live("amr-7", 2, boot=1).report,
            live("amr-7", 7).report,
        ]

    def test_coalesced_state_carries_its_history_once(self, store: Store) -> None:
        w, r = store.writer, store.reader
        reports = [live("amr-c", seq).report for seq in range(1, 6)]
        entries = [(0, report) for report in reports]
        # Three applied reports coalesced into the newest state: all three in history.
        res = w.write([live("amr-c", 3)], [], [], history={"amr-c": entries[:3]})
        assert res.states_applied == 1
        assert [h.seq for h in r.history("amr-c")] == [3, 2, 1]
        before = store.dump()
        w.write([live("amr-c", 3)], [], [], history={"amr-c": entries[:3]})
        assert store.dump() == before  # a replay adds nothing
        # A replay that overlaps what is stored adds only the newer reports.
        w.write([live("amr-c", 5)], [], [], history={"amr-c": entries[1:]})
        assert [h.seq for h in r.history("amr-c")] == [5, 4, 3, 2, 1]
        assert r.get("amr-c") == live("amr-c", 5)

    @hsettings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(data=st.data())
    def test_any_shuffle_or_duplication_gives_the_same_state(
        self, make_store: Callable[..., Store], data: st.DataObject
    ) -> None:
        store = make_store(history_len=5)  # a fresh prefix per example
        versions = [live("r1", q, boot=b, battery=float(q)) for b in (0, 1) for q in range(6)]
        marks = [live("r1", 5, boot=1, battery=5.0, online=False)]  # offline, no new report
        writes = data.draw(st.lists(st.sampled_from(versions + marks), min_size=1, max_size=30))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(writes)), max_size=4)))
        model = Model(history_len=5)
        for lo, hi in itertools.pairwise([0, *cuts, len(writes)]):
            store.writer.write(writes[lo:hi], [], [])
            model.write(writes[lo:hi])
        assert store.reader.get("r1") == model.states["r1"]
        assert store.reader.history("r1") == model.history["r1"]
        got = [decode_change(p) for _, p in read_changes(store.reader, None, 100)]
        assert got == model.events

    def test_replaying_batches_changes_nothing(self, store: Store) -> None:
        batches = random_workload(seed=11, robots=40)
        extras = [
            (
                list(batches[0]),
                [window("amr-1", 0), window("amr-1", 1)],
                [alert("amr-1", "estop", 1)],
            ),
            ([live("amr-1", 19, boot=2, online=False)], [window("amr-1", 1, count=3)], []),
        ]
        calls = [(b, [], []) for b in batches] + extras
        for states, windows, alerts in calls:
            store.writer.write(states, windows, alerts)
        before, summary = store.dump(), store.reader.summary()
        assert any(":stream:changes" in k for k in before) and len(before) > 40
        for states, windows, alerts in calls:
            res = store.writer.write(states, windows, alerts)
            assert (res.states_applied, res.alerts_added) == (0, 0)
            assert (res.states_ignored, res.alerts_duplicate) == (len(states), len(alerts))
        # Windows are last-writer-wins by start: replaying the first batch rewrites
        # window 1 to count 10 for a moment, replaying the second restores count 3.
        assert store.reader.stats("amr-1") == [window("amr-1", 1, count=3), window("amr-1", 0)]
        assert store.writer.write([], extras[1][1], []).windows_ignored == 1
        # One big shuffled replay of everything, as a recovery with other epochs might send.
        everything = [s for states, _, _ in calls for s in states]
        random.Random(3).shuffle(everything)
        assert store.writer.write(everything, [], []).applied == 0
        assert store.dump() == before
        assert store.reader.summary() == summary

    def test_offline_mark_at_equal_order_is_applied_once(self, store: Store) -> None:
        w, r = store.writer, store.reader
        w.write([live("amr-3", 4, site="south")], [], [])
        res = w.write([live("amr-3", 4, site="south", online=False)], [], [])
        assert res.states_applied == 1
        state = r.get("amr-3")
        assert state is not None and state.online is False
        s = r.summary()
        assert (s.online, s.offline) == (0, 1)
        assert [x.report.robot_id for x in list_all(r, 10, online=False)] == ["amr-3"]
        assert list_all(r, 10, online=True) == []
        # The older online state again (a replay): not applied, no event, no history entry.
        res = w.write(
            [live("amr-3", 4, site="south"), live("amr-3", 4, site="south", online=False)], [], []
        )
        assert res.states_applied == 0
        assert len(r.history("amr-3")) == 1
        assert len(r.changes(None, 100)) == 2
        # Back online comes with the next report that arrives, even an older one (the
        # robot is sending): a later change at the same order, no history entry.
        back = live("amr-3", 4, site="south", updated=1.7e9 + 4 + 9.0)
        assert w.write([back], [], []).states_applied == 1
        assert r.summary().online == 1
        assert len(r.history("amr-3")) == 1
        w.write([live("amr-3", 5, site="south", updated=1.7e9 + 5 + 10.0)], [], [])
        assert r.summary().online == 1
        assert [x.report.seq for x in list_all(r, 10, online=True)] == [5]
        assert [x.seq for x in r.history("amr-3")] == [5, 4]

    def test_an_order_reset_lets_a_lower_boot_and_seq_apply_and_enter_history(
        self, store: Store
    ) -> None:
        w, r = store.writer, store.reader
        w.write([live("amr-r", 9, boot=5)], [], [])
        stuck = live("amr-r", 2, boot=0)
        assert w.write([stuck], [], []).states_applied == 0  # older: stale
        reset = msgspec.structs.replace(
            live("amr-r", 9, boot=5), resets=1, reset_pending=True, updated=1.8e9
        )
        assert w.write([reset], [], []).states_applied == 1
        assert len(r.history("amr-r")) == 1  # the reset itself applies no report
        after = msgspec.structs.replace(live("amr-r", 3, boot=0), resets=1, updated=1.8e9 + 1)
        assert w.write([after], [], []).states_applied == 1
        assert [(x.boot, x.seq) for x in r.history("amr-r")] == [(0, 3), (5, 9)]
        got = r.get("amr-r")
        assert got is not None and (got.resets, got.report.order) == (1, (0, 3))
        # Replays of anything before change nothing.
        before = store.dump()
        assert w.write([reset, live("amr-r", 9, boot=5), stuck], [], []).states_applied == 0
        assert store.dump() == before

    def test_alerts_written_twice_appear_once(self, store: Store) -> None:
        w, r = store.writer, store.reader
        a1, a2 = alert("amr-1", "low_battery", 1), alert("amr-2", "estop", 2)
        a3 = alert("amr-1", "error", 3)
        res = w.write([], [], [a1, a2, a1])
        assert (res.alerts_added, res.alerts_duplicate) == (2, 1)
        res = w.write([], [], [a3, a2, a1])
        assert (res.alerts_added, res.alerts_duplicate) == (1, 2)
        assert r.alerts() == [a3, a2, a1]  # newest written first
        assert r.alerts(robot_id="amr-1") == [a3, a1]  # newest event time first
        assert r.alerts(kind="estop") == [a2]
        assert r.alerts(robot_id="amr-1", kind="error") == [a3]
        assert r.alerts(since=T0 + timedelta(seconds=2)) == [a3, a2]
        assert r.alerts(robot_id="amr-1", since=T0 + timedelta(seconds=2)) == [a3]
        assert r.alerts(limit=1) == [a3]
        events = [decode_change(p) for _, p in r.changes(None, 100)]
        assert events == [AlertRaised(alert=a) for a in (a1, a2, a3)]

    def test_windows_rewritten_give_one_entry(self, store: Store) -> None:
        w, r = store.writer, store.reader
        res = w.write([], [window("amr-1", 0), window("amr-1", 1), window("amr-1", 2)], [])
        assert res.windows_applied == 3
        res = w.write([], [window("amr-1", 1, count=42), window("amr-1", 0)], [])
        assert (res.windows_applied, res.windows_ignored) == (1, 1)
        assert r.stats("amr-1") == [
            window("amr-1", 2),
            window("amr-1", 1, count=42),
            window("amr-1", 0),
        ]
        assert r.stats("amr-1", limit=1) == [window("amr-1", 2)]
        assert r.stats("amr-1", since=T0 + timedelta(minutes=1)) == [
            window("amr-1", 2),
            window("amr-1", 1, count=42),
        ]
        assert r.stats("amr-2") == []
        assert r.changes(None, 10) == []  # windows are not change events

    def test_a_reopened_minute_is_kept_beside_the_first(self, store: Store) -> None:
        # After a robot's clock went back, the flow writes a minute it had closed before
        # as a new part: both are kept, neither overwrites the other, replays change nothing.
        w, r = store.writer, store.reader
        first = window("amr-p", 0, count=7)
        again = msgspec.structs.replace(window("amr-p", 0, count=3), part=1)
        assert w.write([], [first, again, window("amr-p", 1)], []).windows_applied == 3
        assert w.write([], [again, first], []).windows_ignored == 2
        assert r.stats("amr-p") == [window("amr-p", 1), again, first]
        assert r.stats("amr-p", since=T0 + timedelta(minutes=1)) == [window("amr-p", 1)]

    def test_history_is_capped_newest_first(self, make_store: Callable[..., Store]) -> None:
        store = make_store(history_len=5)
        store.writer.write([live("amr-9", q) for q in range(1, 13)], [], [])
        assert [h.seq for h in store.reader.history("amr-9")] == [12, 11, 10, 9, 8]
        assert [h.seq for h in store.reader.history("amr-9", limit=2)] == [12, 11]
        since = T0 + timedelta(seconds=10)
        assert [h.seq for h in store.reader.history("amr-9", since=since)] == [12, 11, 10]

    def test_summary_equals_counts_over_the_listing(self, store: Store) -> None:
        model = Model()
        for batch in random_workload(seed=20240601):
            store.writer.write(batch, [], [])
            model.write(batch)
        low = store.settings.low_battery_pct
        listed = list_all(store.reader, limit=37)
        assert len(listed) == 200
        assert store.reader.summary() == summary_of(listed, low)
        assert summary_of(listed, low) == summary_of(list(model.states.values()), low)

    def test_list_filters_and_paging(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        model = Model()
        for batch in random_workload(seed=7):
            store.writer.write(batch, [], [])
            model.write(batch)
        everyone = sorted(model.states.values(), key=lambda s: s.report.robot_id)
        assert list_all(store.reader, limit=1000) == everyone
        combos = itertools.product(
            [None, "idle", "estop"],
            [None, "north", "nowhere"],
            [None, True, False],
            [None, 20.0, 60.5],
        )
        for status, site, online, battery_lt in combos:
            want = [
                s
                for s in everyone
                if (status is None or s.report.status == status)
                and (site is None or s.report.site == site)
                and (online is None or s.online == online)
                and (battery_lt is None or s.report.battery < battery_lt)
            ]
            filters = {"status": status, "site": site, "online": online, "battery_lt": battery_lt}
            for limit in (1, 7, 100):
                assert list_all(store.reader, limit, **filters) == want, (filters, limit)
        # A small scan budget: pages may come back short, the cursor still covers all.
        monkeypatch.setattr(state.reads, "MAX_SCAN", 10)
        want = [s for s in everyone if s.online and s.report.site == "south"]
        assert list_all(store.reader, 3, online=True, site="south") == want
        first, cursor = store.reader.list_robots(online=True, site="south", limit=3)
        assert len(first) <= 3 and cursor is not None
        with pytest.raises(ValueError, match="cursor"):
            store.reader.list_robots(cursor="bad cursor!")
        with pytest.raises(ValueError, match="cursor"):
            store.reader.list_robots(cursor="amr-1\n")
        with pytest.raises(ValueError, match="limit"):
            store.reader.list_robots(limit=0)
        with pytest.raises(ValueError, match="battery_lt"):
            store.reader.list_robots(battery_lt=float("nan"))

    def test_changes_resume_without_gaps_or_repeats(self, store: Store) -> None:
        model = Model()
        calls = [
            ([live("a", 1), live("b", 1), live("a", 3), live("a", 2)], [alert("a", "error", 3)]),
            ([live("b", 2, online=False), live("c", 1)], [alert("a", "error", 3)]),
            ([live("b", 2, online=False), live("b", 1)], [alert("b", "offline", 2)]),
        ]
        for states, alerts in calls:
            store.writer.write(states, [], alerts)
            model.write(states, alerts)
        whole = store.reader.changes(None, 1000)
        assert [decode_change(p) for _, p in whole] == model.events
        ids = [i for i, _ in whole]
        assert (
            ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == 7
        )
        assert read_changes(store.reader, None, 2) == whole
        for k in range(len(whole)):
            assert read_changes(store.reader, whole[k][0], 3) == whole[k + 1 :]
        assert store.reader.latest_change_id() == whole[-1][0]

    def test_changes_blocks_until_a_change(self, store: Store) -> None:
        last = store.reader.latest_change_id()
        assert store.reader.changes(last, 10, block_ms=50) == []
        timer = threading.Timer(0.2, store.writer.write, ([live("late", 1)], [], []))
        timer.start()
        try:
            started = time.monotonic()
            got = store.reader.changes(last, 10, block_ms=10_000)
            assert time.monotonic() - started < 5
        finally:
            timer.join()
        assert [decode_change(p) for _, p in got] == [StateChanged(state=live("late", 1))]
        with pytest.raises(ValueError, match="stream id"):
            store.reader.changes("yesterday", 10)

    def test_a_retirement_removes_a_robot_and_replays_from_before_cannot_bring_it_back(
        self, store: Store
    ) -> None:
        w, r = store.writer, store.reader
        low = store.settings.low_battery_pct
        keep = live("keep", 3, site="south", status="moving")
        old = [live("gone", 1, battery=5.0), live("gone", 2, battery=5.0, status="error")]
        w.write([keep, old[0]], [window("gone", 1)], [alert("gone", "low_battery", 1)])
        w.write([old[1]], [window("gone", 2)], [alert("gone", "error", 2)])
        assert r.summary() == summary_of([keep, old[1]], low)
        at_ms = round(old[1].updated * 1000) + 500

        res = w.write([], [], [], retired=[("gone", at_ms)])
        assert res.retired == 1
        assert r.get("gone") is None and r.history("gone") == [] and r.stats("gone") == []
        assert r.alerts(robot_id="gone") == [] and r.list_robots() == ([keep], None)
        assert r.summary() == summary_of([keep], low)
        last = r.changes(None, 100)[-1][1]
        assert decode_change(last) == RobotRetired(robot_id="gone", at=from_epoch_us(at_ms * 1000))
        dump = store.dump()
        tombstone = ("hash", {b"gone": str(at_ms).encode()})
        assert dump[Keys(store.settings.redis_prefix).robot("gone")] == tombstone
        assert not [k for k in dump if "{gone}" in k and not k.endswith(":robot:{gone}")]

        # A replay of everything before it, and of the retirement: nothing changes.
        w.write(old, [window("gone", 1), window("gone", 2)], [alert("gone", "error", 2)])
        res = w.write([], [], [], retired=[("gone", at_ms)])
        assert res.retired == 0 and store.dump() == dump

        # A state from after it starts the robot's next life, clean.
        back = live("gone", 1, updated=at_ms / 1000 + 0.001)
        res = w.write([back], [window("gone", 3)], [alert("gone", "error", 3)])
        assert (res.states_applied, res.windows_applied, res.alerts_added) == (1, 1, 1)
        assert r.get("gone") == back and [h.seq for h in r.history("gone")] == [1]
        assert r.summary() == summary_of([keep, back], low)


# --- backend-specific -----------------------------------------------------------------------
class TestRedisBackend:
    def test_indexes_hold_exactly_the_matching_robots(
        self, make_store: Callable[..., Store]
    ) -> None:
        # The reader re-checks candidates against the robot hash, so a stale index
        # entry would not show in listings; it would only leak. Check the keys.
        store = make_store()
        model = Model()
        for batch in random_workload(seed=5, robots=120):
            store.writer.write(batch, [], [])
            model.write(batch)
        keys, final = Keys(store.settings.redis_prefix), list(model.states.values())
        dump = store.dump()

        def members(key: str) -> set[str]:
            kind, value = dump.get(key, ("zset", []))
            assert kind == "zset"
            return {m.decode() for m, _ in value}

        def ids(pred: Callable[[LiveState], bool]) -> set[str]:
            return {x.report.robot_id for x in final if pred(x)}

        assert members(keys.all) == ids(lambda x: True)
        assert members(keys.online) == ids(lambda x: x.online)
        assert members(keys.offline) == ids(lambda x: not x.online)
        for status in STATUSES:
            assert members(keys.status_index(status)) == ids(
                lambda x, s=status: x.report.status == s
            )
        for site in SITES[:-1]:
            assert members(keys.site_index(site)) == ids(lambda x, s=site: x.report.site == s)
        # Scored by whole percent (moved only when that changes); listings re-check the level.
        assert dict(dump[keys.battery][1]) == {
            x.report.robot_id.encode(): math.floor(x.report.battery) for x in final
        }

    def test_battery_below_is_exact_at_the_edges_of_the_index_buckets(self, store: Store) -> None:
        levels = {"b-0": 19.0, "b-1": 19.5, "b-2": 19.949, "b-3": 19.95, "b-4": 19.99, "b-5": 20.0}
        store.writer.write(
            [live(rid, 1, battery=level, site=None) for rid, level in levels.items()], [], []
        )
        for below in (19.0, 19.5, 19.95, 19.99, 20.0, 20.01, 100.0):
            got = {x.report.robot_id for x in list_all(store.reader, 2, battery_lt=below)}
            assert got == {rid for rid, level in levels.items() if level < below}, below

    def test_capped_windows_and_alerts_stay_idempotent(
        self, make_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Per-robot retention is a writer constant; shrink it to exercise trimming.
        monkeypatch.setattr(state.writer, "WINDOWS_PER_ROBOT", 3)
        monkeypatch.setattr(state.writer, "ALERTS_PER_ROBOT", 3)
        store = make_store()
        wins = [window("amr-1", m) for m in range(6)]
        alerts = [alert("amr-1", "error", q) for q in range(1, 6)]
        res = store.writer.write([], wins[:2], alerts[:2])
        res = store.writer.write([], wins[2:], alerts[2:])
        assert (res.windows_applied, res.alerts_added) == (4, 3)
        assert store.reader.stats("amr-1") == wins[:2:-1]
        assert store.reader.alerts(robot_id="amr-1") == alerts[:1:-1]
        before = store.dump()
        # Trimmed ones come back in a replay: older than every kept one, so ignored.
        res = store.writer.write([], wins, alerts)
        assert (res.windows_applied, res.alerts_added) == (0, 0)
        assert store.dump() == before
        assert store.reader.alerts() == alerts[::-1]  # the global stream kept all five

    @pytest.mark.parametrize(
        "url", ["rediss://u:p@127.0.0.1:6380/2", "unix:///tmp/redis.sock?db=1", "redis://h/3"]
    )
    def test_urls_make_clients(self, settings: Settings, url: str) -> None:
        client = connect(msgspec.structs.replace(settings, redis_url=url))  # no I/O yet
        try:
            db = int(url.rsplit("/", 1)[-1]) if url.startswith("redis") else 1
            assert client.connection_pool.connection_kwargs["db"] == db
        finally:
            client.close()

    def test_a_bad_url_names_the_setting(self, settings: Settings) -> None:
        with pytest.raises(ConfigError, match="FLEETPULSE_REDIS_URL"):
            connect(msgspec.structs.replace(settings, redis_url="http://127.0.0.1:1"))
        sentinel = msgspec.structs.replace(
            settings, redis_url="tcp://x", redis_sentinels="127.0.0.1:1"
        )
        with pytest.raises(ConfigError, match="FLEETPULSE_REDIS_URL"):
            connect_reader(sentinel)

    def test_writer_reloads_scripts_after_a_flush(
        self, sentinel_group: SentinelGroup, settings: Settings
    ) -> None:
        # On the private master: SCRIPT FLUSH on the shared stack would hit other users.
        s = sentinel_group.settings(settings, redis_prefix=f"t{uuid.uuid4().hex[:20]}")
        client = connect(s)
        try:
            writer = RedisStateWriter(client, s)
            assert writer.write([live("amr-1", 1)], [], []).states_applied == 1
            client.script_flush()
            res = writer.write(
                [live("amr-1", 2)], [window("amr-1", 0)], [alert("amr-1", "error", 2)]
            )
            assert (res.states_applied, res.windows_applied, res.alerts_added) == (1, 1, 1)
        finally:
            for key in client.scan_iter(match=Keys(s.redis_prefix).pattern()):
                client.delete(key)
            client.close()

    def test_sentinel_reads_from_the_replica(
        self, sentinel_group: SentinelGroup, settings: Settings
    ) -> None:
        s = sentinel_group.settings(
            settings, redis_prefix=f"t{uuid.uuid4().hex[:20]}", redis_read_from_replicas=True
        )
        master, replica = connect(s), connect_reader(s)
        try:
            assert master.info("replication")["role"] == "master"
            assert replica.info("replication")["role"] == "slave"
            RedisStateWriter(master, s).write([live("amr-1", 4), live("amr-2", 1)], [], [])
            assert master.execute_command("WAIT", 1, 5000) == 1
            assert RedisStateReader(replica, s).get("amr-1") == live("amr-1", 4)
            # The asyncio reader reads the replica too, the page script included (loaded
            # there on first use: EVALSHA_RO runs on a read-only replica).
            replica.script_flush()
            awaited = AwaitedReader(s, RedisStateReader(replica, s))
            try:
                role = awaited.runner.run(awaited.client.info("replication"))["role"]
                assert role == "slave"
                assert awaited.get("amr-1") == live("amr-1", 4)
                assert awaited.list_robots() == ([live("amr-1", 4), live("amr-2", 1)], None)
            finally:
                awaited.close()
        finally:
            for key in master.scan_iter(match=Keys(s.redis_prefix).pattern()):
                master.delete(key)
            master.close()
            replica.close()

    def test_concurrent_async_reads_each_get_their_own_answer(self, store: Store) -> None:
        # Commands of concurrent reads share pipelines (state.async_reader); every read
        # must still get exactly its own reply, an unknown robot's None included.
        model = Model()
        for batch in random_workload(seed=99, robots=60):
            store.writer.write(batch, [], [])
            model.write(batch)
        store.writer.write([], [window("amr-1", m) for m in range(3)], [])
        blocking = store.reader
        ids = sorted(model.states) + [f"ghost-{i}" for i in range(10)]
        blocking_client = connect_reader(store.settings)
        awaited = AwaitedReader(store.settings, RedisStateReader(blocking_client, store.settings))
        try:

            async def all_at_once() -> list[Any]:
                reads: list[Any] = [awaited.reader.get(rid) for rid in ids]
                reads += [awaited.reader.list_robots(status=st, limit=7) for st in STATUSES]
                reads += [awaited.reader.summary(), awaited.reader.stats("amr-1")]
                reads += [awaited.reader.history(rid, limit=3) for rid in ids[:20]]
                return await asyncio.gather(*reads)

            got = awaited.runner.run(all_at_once())
        finally:
            awaited.close()
            blocking_client.close()
        want: list[Any] = [blocking.get(rid) for rid in ids]
        want += [blocking.list_robots(status=st, limit=7) for st in STATUSES]
        want += [blocking.summary(), blocking.stats("amr-1")]
        want += [blocking.history(rid, limit=3) for rid in ids[:20]]
        assert got == want
        assert got[: len(ids)] == [model.states.get(rid) for rid in ids]
        assert sum(x is None for x in got[: len(ids)]) == 10

    def test_async_reads_reload_a_flushed_script_and_fail_alike_when_redis_is_away(
        self, sentinel_group: SentinelGroup, settings: Settings
    ) -> None:
        # On the private master: SCRIPT FLUSH on the shared stack would hit other users.
        s = sentinel_group.settings(settings, redis_prefix=f"t{uuid.uuid4().hex[:20]}")
        client = connect(s)
        awaited = AwaitedReader(s, RedisStateReader(client, s))
        try:
            RedisStateWriter(client, s).write([live(f"r{i}", 1) for i in range(5)], [], [])
            client.script_flush()

            async def pages() -> list[Any]:
                return await asyncio.gather(
                    *(awaited.reader.list_robots(limit=2) for _ in range(8))
                )

            assert awaited.runner.run(pages()) == [([live("r0", 1), live("r1", 1)], "r1")] * 8
        finally:
            awaited.close()
            for key in client.scan_iter(match=Keys(s.redis_prefix).pattern()):
                client.delete(key)
            client.close()
        down = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
        down_client = connect(down)
        awaited = AwaitedReader(down, RedisStateReader(down_client, down))
        try:

            async def reads() -> list[Any]:
                calls = [awaited.reader.get("amr-1"), awaited.reader.summary()] * 5
                return await asyncio.gather(*calls, return_exceptions=True)

            errors = awaited.runner.run(reads())
            assert all(isinstance(e, redis.ConnectionError) for e in errors), errors
        finally:
            awaited.close()
            down_client.close()
