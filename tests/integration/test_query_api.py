"""The query routes against real Redis, with state written by the real sink writer.

Expected answers come from plain Python over the workload written (the ``Model`` and
``summary_of`` of the state contract suite); every test has its own key prefix.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from typing import Any

import msgspec
import pytest
import redis
from litestar.testing import TestClient

import state.reads
from api.app import create_app
from api.auth import hash_token, new_token
from api.query import AlertList, ReportList, RobotPage, WindowList
from deploy.local.procs import free_port
from fleetpulse.reload import config_hash
from fleetpulse.schema import STATUSES, LiveState
from fleetpulse.settings import Settings
from state import FleetSummary, Keys, RedisStateReader, RedisStateWriter, connect
from tests.integration.test_state_contract import (
    T0,
    Model,
    alert,
    live,
    random_workload,
    summary_of,
    window,
)

pytestmark = pytest.mark.integration

READ = new_token()
INGEST = new_token()
TOKENS = f"read:{hash_token(READ)},ingest:{hash_token(INGEST)}"


@dataclass
class Fleet:
    """A private key prefix with the real writer and reader on it."""

    settings: Settings
    client: redis.Redis
    writer: RedisStateWriter
    reader: RedisStateReader
    model: Model = field(default_factory=Model)

    def write(self, states: list[LiveState], windows: Any = (), alerts: Any = ()) -> None:
        self.writer.write(states, list(windows), list(alerts))
        self.model.write(states, list(alerts))


@contextmanager
def private_fleet(settings: Settings) -> Iterator[Fleet]:
    """A fresh key prefix (deleted afterwards) and tokens READ and INGEST configured."""
    prefix = f"q{uuid.uuid4().hex[:20]}"
    s = msgspec.structs.replace(settings, redis_prefix=prefix, api_tokens=TOKENS)
    client = connect(s)
    try:
        yield Fleet(s, client, RedisStateWriter(client, s), RedisStateReader(client, s))
    finally:
        for key in client.scan_iter(match=Keys(prefix).pattern(), count=1000):
            client.delete(key)
        client.close()


@pytest.fixture
def fleet(stack: object, settings: Settings) -> Iterator[Fleet]:
    with private_fleet(settings) as f:
        yield f


@pytest.fixture
def api(fleet: Fleet) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(fleet.settings, ingest=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {READ}"
        yield c


def decode(r: Any, kind: type[Any]) -> Any:
    assert r.status_code == 200, r.text
    return msgspec.json.decode(r.content, type=kind)


def pages(api: TestClient[Any], limit: int, **filters: Any) -> list[RobotPage]:
    """Every page the API gives for ``filters``, following next_cursor to the end."""
    params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in filters.items()}
    out: list[RobotPage] = []
    cursor: str | None = None
    for _ in range(10_000):
        extra = {"cursor": cursor} if cursor else {}
        page: RobotPage = decode(
            api.get("/v1/robots", params={**params, "limit": limit, **extra}), RobotPage
        )
        assert len(page.items) <= limit
        out.append(page)
        cursor = page.next_cursor
        if cursor is None:
            return out
    raise AssertionError("the listing never ended")


def list_all(api: TestClient[Any], limit: int, **filters: Any) -> list[LiveState]:
    """Every robot the API lists for ``filters``."""
    return [s for page in pages(api, limit, **filters) for s in page.items]


def matching(states: list[LiveState], **f: Any) -> list[LiveState]:
    return sorted(
        (
            s
            for s in states
            if (f.get("status") is None or s.report.status == f["status"])
            and (f.get("site") is None or s.report.site == f["site"])
            and (f.get("online") is None or s.online == f["online"])
            and (f.get("battery_lt") is None or s.report.battery < f["battery_lt"])
        ),
        key=lambda s: s.report.robot_id,
    )


# --- listing and paging ---------------------------------------------------------------------
def test_filters_and_paging_return_exactly_the_matching_robots(
    fleet: Fleet, api: TestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for batch in random_workload(seed=424242, robots=300):
        fleet.write(batch)
    everyone = list(fleet.model.states.values())
    assert len(everyone) == 300
    assert list_all(api, 1000) == matching(everyone)
    assert list_all(api, 7) == matching(everyone)
    combos = list(
        itertools.product(
            [None, "idle", "estop", "charging"],
            [None, "north", "dock.7", "nowhere"],
            [None, True, False],
            [None, 0.0, 20.0, 60.5],
        )
    )
    nonempty = 0
    for status, site, online, battery_lt in combos:
        f = {"status": status, "site": site, "online": online, "battery_lt": battery_lt}
        given = {k: v for k, v in f.items() if v is not None}
        want = matching(everyone, **f)
        nonempty += bool(want)
        assert list_all(api, 1000, **given) == want, given
        if len(given) <= 1 or (status == "idle" and online is True):
            assert list_all(api, 7, **given) == want, given
    assert nonempty > len(combos) // 3  # the filters were not all trivially empty
    assert list_all(api, 1, status="idle") == matching(everyone, status="idle")
    # A small scan budget per request: pages come back short, the cursor still covers all.
    monkeypatch.setattr(state.reads, "MAX_SCAN", 10)
    got = pages(api, 3, status="idle", site="south")
    assert [s for page in got for s in page.items] == matching(
        everyone, status="idle", site="south"
    )
    assert any(len(page.items) < 3 and page.next_cursor is not None for page in got)


def test_next_cursor_resumes_after_the_last_robot_examined(
    fleet: Fleet, api: TestClient[Any]
) -> None:
    fleet.write([live(f"amr-{i}", 1) for i in range(5)])
    page: RobotPage = decode(api.get("/v1/robots", params={"limit": 2}), RobotPage)
    assert [s.report.robot_id for s in page.items] == ["amr-0", "amr-1"]
    assert page.next_cursor == "amr-1"
    page = decode(api.get("/v1/robots", params={"limit": 2, "cursor": page.next_cursor}), RobotPage)
    assert [s.report.robot_id for s in page.items] == ["amr-2", "amr-3"]
    page = decode(api.get("/v1/robots", params={"limit": 2, "cursor": page.next_cursor}), RobotPage)
    assert ([s.report.robot_id for s in page.items], page.next_cursor) == (["amr-4"], None)


def test_paging_is_stable_under_concurrent_updates(fleet: Fleet, api: TestClient[Any]) -> None:
    rng = random.Random(31)
    ids = [f"r{i:04d}" for i in range(300)]
    stays_idle = set(rng.sample(ids, 150))  # updated all the time, but always idle
    seq = dict.fromkeys(ids, 1)
    fleet.write([live(rid, 1, status="idle") for rid in ids])
    stop = threading.Event()
    writes = 0

    def churn() -> None:
        nonlocal writes
        local = random.Random(7)
        while not stop.is_set():
            batch = []
            for rid in local.sample(ids, 30):
                seq[rid] += 1
                status = "idle" if rid in stays_idle else local.choice(STATUSES)
                batch.append(live(rid, seq[rid], status=status, battery=local.uniform(0, 100)))
            fleet.writer.write(batch, [], [])
            writes += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3):
            seen_all = [s.report.robot_id for s in list_all(api, 9)]
            seen_idle = [s.report.robot_id for s in list_all(api, 9, status="idle")]
            # Id order, no robot twice, none that stayed in the filter missed.
            assert seen_all == ids
            assert seen_idle == sorted(set(seen_idle))
            assert stays_idle <= set(seen_idle)
    finally:
        stop.set()
        thread.join()
    assert writes >= 3  # the listing really ran beside the writes


def test_summary_equals_the_counts_over_every_robot_listed(
    fleet: Fleet, api: TestClient[Any]
) -> None:
    rng = random.Random(77)
    batches = random_workload(seed=20261126, robots=400)
    for i, batch in enumerate(batches):
        fleet.write(batch)
        if i % 10 == 9:  # the dataflow's offline marks: same report, online False
            marks = [
                msgspec.structs.replace(s, online=False)
                for s in rng.sample(list(fleet.model.states.values()), 15)
                if s.online
            ]
            fleet.write(marks)
    low = fleet.settings.low_battery_pct
    listed = list_all(api, 53)
    assert len(listed) == 400
    got: FleetSummary = decode(api.get("/v1/fleet/summary"), FleetSummary)
    assert got == summary_of(listed, low)
    assert got == summary_of(list(fleet.model.states.values()), low)
    assert got.offline > 0 and got.low_battery > 0 and len(got.by_site) >= 3
    assert sum(got.by_status.values()) == got.total == 400


# --- one robot ----------------------------------------------------------------------------
def test_live_state_history_stats_and_alerts(fleet: Fleet, api: TestClient[Any]) -> None:
    fleet.write([live("amr-7", 1), live("amr-7", 2, status="moving")])
    fleet.write([live("amr-7", 3, status="error", battery=12.5), live("other", 1)])
    fleet.write([live("amr-7", 5, status="charging", site="dock.7")])
    fleet.writer.write([], [window("amr-7", m) for m in range(5)] + [window("other", 0)], [])
    a1, a2, a3 = (
        alert("amr-7", "low_battery", 3),
        alert("other", "estop", 4),
        alert("amr-7", "error", 5),
    )
    fleet.write([], alerts=[a1, a2, a3])

    assert decode(api.get("/v1/robots/amr-7"), LiveState) == live(
        "amr-7", 5, status="charging", site="dock.7"
    )
    hist: ReportList = decode(api.get("/v1/robots/amr-7/history"), ReportList)
    assert [h.seq for h in hist.items] == [5, 3, 2, 1]
    assert hist.items[1] == live("amr-7", 3, status="error", battery=12.5).report
    assert [
        h.seq for h in decode(api.get("/v1/robots/amr-7/history?limit=2"), ReportList).items
    ] == [5, 3]
    # The same instant written with another offset ('+' must survive the query string).
    since = (T0 + timedelta(seconds=2)).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert "+02:00" in since
    got = decode(api.get("/v1/robots/amr-7/history", params={"since": since}), ReportList)
    assert [h.seq for h in got.items] == [5, 3, 2]
    future = (T0 + timedelta(days=1)).isoformat()
    assert (
        decode(api.get("/v1/robots/amr-7/history", params={"since": future}), ReportList).items
        == []
    )

    stats: WindowList = decode(api.get("/v1/robots/amr-7/stats"), WindowList)
    assert stats.items == [window("amr-7", m) for m in (4, 3, 2, 1, 0)]
    assert decode(api.get("/v1/robots/amr-7/stats?limit=2"), WindowList).items == [
        window("amr-7", 4),
        window("amr-7", 3),
    ]
    since = (T0 + timedelta(minutes=3)).isoformat()
    assert decode(api.get("/v1/robots/amr-7/stats", params={"since": since}), WindowList).items == [
        window("amr-7", 4),
        window("amr-7", 3),
    ]

    def alerts(**params: Any) -> list[Any]:
        return decode(api.get("/v1/alerts", params=params), AlertList).items  # type: ignore[no-any-return]

    assert alerts() == [a3, a2, a1]
    assert alerts(robot_id="amr-7") == [a3, a1]
    assert alerts(kind="estop") == [a2]
    assert alerts(robot_id="amr-7", kind="error") == [a3]
    assert alerts(since=(T0 + timedelta(seconds=4)).isoformat()) == [a3, a2]
    assert alerts(limit=1) == [a3]
    assert alerts(robot_id="ghost") == []


@pytest.mark.parametrize(
    "route", ["/v1/robots/ghost", "/v1/robots/ghost/history", "/v1/robots/ghost/stats"]
)
def test_unknown_robot_is_404_with_a_clear_body(
    fleet: Fleet, api: TestClient[Any], route: str
) -> None:
    fleet.write([live("amr-1", 1)])
    r = api.get(route)
    assert r.status_code == 404
    assert r.json() == {
        "error": "not_found",
        "detail": "no robot 'ghost' has reported; check the id (GET /v1/robots)",
        "fields": [],
    }


# --- bad parameters and auth ------------------------------------------------------------------
BAD_PARAMS: list[tuple[str, str, dict[str, str], list[str], str]] = [
    # (id, path, headers, fields, detail substring)
    ("status-unknown", "/v1/robots?status=flying", {}, ["status"], "Invalid enum value 'flying'"),
    ("limit-zero", "/v1/robots?limit=0", {}, ["limit"], "limit: Expected `int` >= 1"),
    ("limit-negative", "/v1/robots?limit=-5", {}, ["limit"], ">= 1"),
    ("limit-too-large", "/v1/robots?limit=1001", {}, ["limit"], "<= 1000"),
    ("limit-not-a-number", "/v1/robots?limit=ten", {}, ["limit"], "Expected `int`"),
    ("cursor-garbage", "/v1/robots?cursor=not*a*cursor", {}, ["cursor"], "matching regex"),
    ("cursor-with-space", "/v1/robots?cursor=a%20b", {}, ["cursor"], "matching regex"),
    ("unknown-parameter", "/v1/robots?stauts=idle", {}, ["stauts"], "stauts: not a parameter of this route (it takes: battery_lt, cursor, limit, online, site, status)"),
    ("unknown-on-summary", "/v1/fleet/summary?site=north", {}, ["site"], "(it takes: none)"),
    ("unknown-on-robot", "/v1/robots/amr-1?limit=5", {}, ["limit"], "not a parameter"),
    ("unknown-on-stream", "/v1/stream?since=2025-06-01T00:00:00Z", {}, ["since"], "it takes: last_event_id"),
    ("battery-nan", "/v1/robots?battery_lt=nan", {}, ["battery_lt"], "finite"),
    ("battery-inf", "/v1/robots?battery_lt=inf", {}, ["battery_lt"], "finite"),
    ("battery-minus-inf", "/v1/robots?battery_lt=-Infinity", {}, ["battery_lt"], "finite"),
    ("battery-huge", "/v1/robots?battery_lt=1e999", {}, ["battery_lt"], "out of range"),
    ("battery-text", "/v1/robots?battery_lt=low", {}, ["battery_lt"], "Expected `float"),
    ("online-maybe", "/v1/robots?online=maybe", {}, ["online"], "Expected `bool"),
    ("site-bad", "/v1/robots?site=plant%201", {}, ["site"], "matching regex"),
    ("two-bad", "/v1/robots?status=x&limit=0", {}, ["status", "limit"], "limit"),
    ("robot-id-space", "/v1/robots/a%20b", {}, ["robot_id"], "matching regex"),
    ("robot-id-brace-history", "/v1/robots/%7Bx%7D/history", {}, ["robot_id"], "matching regex"),
    ("robot-id-too-long", "/v1/robots/" + "a" * 65 + "/stats", {}, ["robot_id"], "matching regex"),
    ("history-limit", "/v1/robots/amr-1/history?limit=0", {}, ["limit"], ">= 1"),
    ("history-naive-since", "/v1/robots/amr-1/history?since=2025-06-01T12:00:00", {}, ["since"], "no UTC offset"),
    # A number is a valid datetime to Litestar (seconds since the epoch), not to the schema.
    ("history-number-since", "/v1/robots/amr-1/history?since=0.5", {}, ["since"], "RFC3339"),
    ("alerts-number-since", "/v1/alerts?since=1700000000", {}, ["since"], "RFC3339"),
    ("stats-malformed-since", "/v1/robots/amr-1/stats?since=yesterday", {}, ["since"], "RFC3339"),
    ("stats-date-only-since", "/v1/robots/amr-1/stats?since=2025-06-01", {}, ["since"], "RFC3339"),
    ("alerts-naive-since", "/v1/alerts?since=2025-06-01T12:00:00.5", {}, ["since"], "no UTC offset"),
    ("alerts-kind", "/v1/alerts?kind=fire", {}, ["kind"], "Invalid enum value 'fire'"),
    ("alerts-robot-id", "/v1/alerts?robot_id=a*", {}, ["robot_id"], "matching regex"),
    ("alerts-limit", "/v1/alerts?limit=100000", {}, ["limit"], "<= 1000"),
    ("stream-query-id", "/v1/stream?last_event_id=yesterday", {}, ["last_event_id"], "not an event id"),
    ("stream-header-id", "/v1/stream", {"Last-Event-ID": "1-2-3"}, ["Last-Event-ID"], "not an event id"),
    ("stream-id-too-long", "/v1/stream?last_event_id=999999999999999999999-0", {}, ["last_event_id"], "not an event id"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "headers", "fields", "detail"), [pytest.param(*c[1:], id=c[0]) for c in BAD_PARAMS]
)
def test_bad_parameters_are_422_naming_the_parameter(
    fleet: Fleet,
    api: TestClient[Any],
    path: str,
    headers: dict[str, str],
    fields: list[str],
    detail: str,
) -> None:
    fleet.write([live("amr-1", 1)])
    r = api.get(path, headers=headers)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "fields"}
    assert body["error"] == "invalid_parameter"
    assert body["fields"] == fields
    assert detail in body["detail"]
    assert body["detail"].startswith(fields[0])


QUERY_ROUTES = [
    "/v1/robots",
    "/v1/robots/amr-1",
    "/v1/robots/amr-1/history",
    "/v1/robots/amr-1/stats",
    "/v1/fleet/summary",
    "/v1/alerts",
    "/v1/stream",
]


@pytest.mark.parametrize("route", QUERY_ROUTES)
@pytest.mark.parametrize(
    ("authorization", "status", "detail"),
    [
        pytest.param(None, 401, "missing bearer token", id="no-token"),
        pytest.param("Bearer fp_wrong", 401, "unknown bearer token", id="unknown-token"),
        pytest.param("Basic YTpi", 401, "Bearer <token>", id="basic"),
        pytest.param(
            f"Bearer {INGEST}",
            403,
            "token has scope ingest; this route needs read",
            id="ingest-scope",
        ),
    ],
)
def test_every_query_route_needs_a_read_token(
    fleet: Fleet, route: str, authorization: str | None, status: int, detail: str
) -> None:
    with TestClient(create_app(fleet.settings, ingest=False), raise_server_exceptions=False) as c:
        headers = {} if authorization is None else {"Authorization": authorization}
        r = c.get(route, headers=headers)
    assert r.status_code == status
    body = r.json()
    assert (body["error"], body["fields"]) == ("unauthorized" if status == 401 else "forbidden", [])
    assert detail in body["detail"]
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


# --- Redis: bounded work, readiness, outage ------------------------------------------------------
def redis_commands(fleet: Fleet, action: Callable[[], None]) -> list[list[str]]:
    """The commands the API sent to Redis while ``action`` ran (seen through MONITOR).

    Other tests may share the server, so only connections that touched this test's
    prefix count as the API's. Connection handshakes and health-check PINGs are left out.
    """
    marker = uuid.uuid4().hex
    seen: list[tuple[str, list[str]]] = []
    ready = threading.Event()

    def watch() -> None:
        with fleet.client.monitor() as m:
            ready.set()
            started = False
            while True:
                cmd = m.next_command()
                words = str(cmd["command"]).split(" ")
                if any(marker in w for w in words):
                    if started:
                        return
                    started = True
                elif started and cmd["client_type"] == "tcp":
                    seen.append((str(cmd["client_port"]), words))

    thread = threading.Thread(target=watch)
    thread.start()
    assert ready.wait(5)
    echo = redis.Redis.from_url(fleet.settings.redis_dsn)
    try:
        time.sleep(0.1)  # MONITOR is active once the server answered it
        echo.echo(f"{marker}-start")
        action()
        echo.echo(f"{marker}-end")
        thread.join(10)
    finally:
        echo.close()
    ours = {port for port, words in seen if any(fleet.settings.redis_prefix in w for w in words)}
    setup = {"PING", "HELLO", "CLIENT", "SELECT", "AUTH"}  # a pooled connection's handshake
    return [words for port, words in seen if port in ours and words[0].upper() not in setup]


def test_each_request_costs_bounded_redis_work(fleet: Fleet, api: TestClient[Any]) -> None:
    for batch in random_workload(seed=3, robots=300):
        fleet.write(batch)
    fleet.writer.write([], [window("amr-1", m) for m in range(3)], [alert("amr-1", "error", 1)])
    some = sorted(fleet.model.states)[17]
    routes = {  # route: most commands (pipelined HMGETs count one each)
        f"/v1/robots/{some}": 1,
        "/v1/robots?status=idle&limit=50": 1,
        "/v1/robots?status=idle&site=north&online=true&limit=20": 1,
        "/v1/robots?limit=1000": 1,
        "/v1/robots?status=idle&online=true&battery_lt=50&limit=20": 4 + 300,
        "/v1/fleet/summary": 1,
        f"/v1/robots/{some}/history?limit=10": 1,
        f"/v1/robots/{some}/stats": 3,
        "/v1/alerts?limit=5": 1,
        "/v1/alerts?robot_id=amr-1": 2,
    }
    for route, most in routes.items():
        api.get(route)  # warm: a Redis that lost the page script loads it on first use
        answers: list[Any] = []

        def call(route: str = route, answers: list[Any] = answers) -> None:
            answers.append(api.get(route))

        cmds = redis_commands(fleet, call)
        assert answers[0].status_code == 200, (route, answers[0].text)
        names = {c[0].upper() for c in cmds}
        assert 1 <= len(cmds) <= most, (route, cmds)
        assert not names & {"KEYS", "SCAN", "SMEMBERS", "FLUSHDB", "XRANGE"}, (route, names)
        if route == "/v1/fleet/summary":
            assert cmds == [["HGETALL", f"{fleet.settings.redis_prefix}:summary"]]
        if route.startswith("/v1/robots?") and "battery_lt" not in route:
            # A page is one read-only script call (its ZRANGEBYLEX and HMGETs run inside).
            assert [c[0].upper() for c in cmds] == ["EVALSHA_RO"], (route, cmds)


def test_readiness_reports_redis(fleet: Fleet, api: TestClient[Any]) -> None:
    r = api.get("/readyz")
    ready = {"status": "ready", "config": config_hash(fleet.settings)}
    assert (r.status_code, r.json()) == (200, ready)
    down = msgspec.structs.replace(fleet.settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(down, ingest=False), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "unready" and "redis" in r.json()
        assert "unreachable" in r.json()["redis"]
        assert c.get("/healthz").status_code == 200
        # A query while Redis is away is a 503 the client can retry, not a 500.
        r = c.get("/v1/robots/amr-1", headers={"Authorization": f"Bearer {READ}"})
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "unavailable" and "Redis is unreachable" in r.json()["detail"]
