"""GET /v1/export/{kind} and ``python -m api.export`` against real Redis.

State is written by the real sink writer (small fleets) or straight into Redis in the
writer's format (the million rows); expected rows come from what was written, in
plain Python. Every test has its own key prefix.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
import schemathesis
from hypothesis import given
from litestar.testing import TestClient
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from bench.common import serve_api
from deploy.local.procs import free_port
from fleetpulse.alert_rules import Incident
from fleetpulse.schema import Alert, LiveState, RobotReport, WindowStats
from fleetpulse.settings import Settings, to_env
from state import Keys
from state.export import PAGE_ROWS
from state.keys import epoch_us, window_name
from tests.integration.test_openapi import _on_the_wire, fuzzed
from tests.integration.test_query_api import INGEST, READ, Fleet, private_fleet
from tests.integration.test_state_contract import T0, alert, live, window

pytestmark = pytest.mark.integration

HISTORY_LEN = 300
ROBOTS = ["amr-0", "amr-1", "amr-10", "amr-11", "amr-2", "amr-3", "amr-big"]


def site_of(rid: str) -> str:
    return "south" if rid in ("amr-1", "amr-11", "amr-3") else "north"


# --- the fleet written, and what an export of it must give ------------------------------------
class Written:
    """What was written per robot, in the writer's order (oldest first)."""

    def __init__(self) -> None:
        self.reports: dict[str, list[RobotReport]] = {r: [] for r in ROBOTS}
        self.windows: dict[str, list[WindowStats]] = {r: [] for r in ROBOTS}
        self.alerts: dict[str, list[Alert]] = {r: [] for r in ROBOTS}

    def rows(
        self,
        kind: str,
        robots: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The items an export must give, as JSON objects, in export order."""
        out: list[dict[str, Any]] = []
        for rid in sorted(robots or ROBOTS):
            if kind == "history":
                items: list[Any] = self.reports[rid][-HISTORY_LEN:]
                at = [r.ts for r in items]
            elif kind == "stats":
                items = sorted(
                    self.windows[rid],
                    key=lambda w: (
                        epoch_us(w.window_start),
                        window_name(epoch_us(w.window_start), w.part),
                    ),
                )
                at = [w.window_start for w in items]
            else:
                items = sorted(self.alerts[rid], key=lambda a: (epoch_us(a.at), a.id))
                at = [a.at for a in items]
            out += [
                msgspec.to_builtins(item)
                for item, t in zip(items, at, strict=True)
                if (since is None or t >= since) and (until is None or t < until)
            ]
        return out


def report_of(state: LiveState, **over: Any) -> LiveState:
    return msgspec.structs.replace(state, report=msgspec.structs.replace(state.report, **over))


def seed(fleet: Fleet) -> Written:
    """Seven robots over two sites: histories (one longer than the cap, trimmed, and over
    several pages), windows (a reopened minute among them) and alerts (two at one time)."""
    w = Written()
    counts = {rid: 5 + 3 * i for i, rid in enumerate(ROBOTS)}
    counts["amr-big"] = HISTORY_LEN + 150
    for seq in range(1, max(counts.values()) + 1):
        batch = []
        for rid in ROBOTS:
            if seq <= counts[rid]:
                state = live(rid, seq, site=site_of(rid), battery=float(seq % 100))
                if seq % 7 == 0:  # errors that CSV must quote
                    state = report_of(state, errors=['E1, "motor"', "E2\nline two"], speed=0.25)
                batch.append(state)
                w.reports[rid].append(state.report)
        fleet.write(batch)
    windows: list[WindowStats] = []
    alerts: list[Alert] = []
    for i, rid in enumerate(ROBOTS):
        ws = [window(rid, m, count=m + 1) for m in range(i + 2)]
        ws.append(msgspec.structs.replace(ws[0], part=1, count=99))  # minute 0 reopened
        windows += ws
        w.windows[rid] += ws
        al = [alert(rid, "low_battery", s) for s in range(1, i + 3)]
        # Same time, another kind: ordered by id after the low_battery one.
        al.append(msgspec.structs.replace(alert(rid, "error", 2), detail='worn, "left"\nwheel'))
        alerts += al
        w.alerts[rid] += al
    fleet.writer.write([], windows, alerts)
    return w


@pytest.fixture
def fleet(stack: object, settings: Settings) -> Iterator[Fleet]:
    with private_fleet(msgspec.structs.replace(settings, history_len=HISTORY_LEN)) as f:
        yield f


@pytest.fixture
def written(fleet: Fleet) -> Written:
    return seed(fleet)


@pytest.fixture
def api(fleet: Fleet) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(fleet.settings, ingest=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {READ}"
        yield c


def ndjson(api: TestClient[Any], kind: str, **params: Any) -> list[dict[str, Any]]:
    r = api.get(f"/v1/export/{kind}", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-ndjson"
    return [msgspec.json.decode(line) for line in r.content.splitlines()]


def items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "cursor"} for row in rows]


def incident(rid: str, seq: int, closed: bool) -> Incident:
    at = T0 + timedelta(seconds=seq)
    opened = Incident(
        id=f"{rid}:battery-low:0:{seq}",
        robot_id=rid,
        rule="battery-low",
        severity="critical",
        since=at - timedelta(seconds=3),
        opened_at=at,
        opened_by=(0, seq),
    )
    if not closed:
        return opened
    later = at + timedelta(seconds=4)
    return msgspec.structs.replace(
        opened, state="closed", closed_at=later, closed_by=(0, seq + 4), reason="cleared"
    )


def test_incidents_export_their_newest_version_in_opened_order(
    api: TestClient[Any], fleet: Fleet, written: Written
) -> None:
    opened = [incident("amr-1", s, False) for s in (2, 9)] + [incident("amr-2", 5, False)]
    fleet.writer.write([], [], [], incidents=opened)
    fleet.writer.write([], [], [], incidents=[incident("amr-1", 2, True)])  # the first closed
    rows = ndjson(api, "incidents")
    newest = [incident("amr-1", 2, True), opened[1], opened[2]]
    assert items(rows) == [msgspec.json.decode(msgspec.json.encode(i)) for i in newest]
    assert (
        rows[0]["cursor"]
        == f"incidents/amr-1/{epoch_us(newest[0].opened_at)}/amr-1:battery-low:0:2"
    )
    rest = ndjson(api, "incidents", cursor=rows[0]["cursor"])
    assert rest == rows[1:]
    ranged = ndjson(
        api,
        "incidents",
        since=(T0 + timedelta(seconds=3)).isoformat(),
        until=(T0 + timedelta(seconds=9)).isoformat(),
    )
    assert [r["id"] for r in ranged] == ["amr-2:battery-low:0:5"]
    r = api.get("/v1/export/incidents", params={"format": "csv", "robot_id": "amr-1"})
    assert r.status_code == 200, r.text
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [(t["id"], t["state"], t["opened_by"]) for t in table] == [
        ("amr-1:battery-low:0:2", "closed", "0;2"),
        ("amr-1:battery-low:0:9", "open", "0;9"),
    ]


# --- exact rows, order, range ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["history", "stats", "alerts"])
def test_exports_give_exactly_the_rows_in_order(
    api: TestClient[Any], written: Written, kind: str
) -> None:
    assert items(ndjson(api, kind)) == written.rows(kind)
    south = [r for r in ROBOTS if site_of(r) == "south"]
    assert items(ndjson(api, kind, site="south")) == written.rows(kind, south)
    assert items(ndjson(api, kind, site="nowhere")) == []
    assert items(ndjson(api, kind, robot_id="amr-10")) == written.rows(kind, ["amr-10"])
    since, until = RANGES[kind]
    ranged = ndjson(api, kind, since=since.isoformat(), until=until.isoformat())
    assert items(ranged) == written.rows(kind, None, since, until)
    assert ranged, "the range holds rows"
    # Given in another offset, the same instants.
    east = timezone_plus_2(since), timezone_plus_2(until)
    assert ndjson(api, kind, since=east[0], until=east[1]) == ranged


RANGES = {
    "history": (T0 + timedelta(seconds=3), T0 + timedelta(seconds=20)),
    "stats": (T0 + timedelta(minutes=1), T0 + timedelta(minutes=4)),
    "alerts": (T0 + timedelta(seconds=2), T0 + timedelta(seconds=5)),
}


def timezone_plus_2(t: datetime) -> str:
    return t.astimezone(timezone(timedelta(hours=2))).isoformat()


def test_history_rows_are_oldest_first_over_pages_and_the_cap(
    api: TestClient[Any], written: Written
) -> None:
    rows = ndjson(api, "history", robot_id="amr-big")
    seqs = [r["seq"] for r in rows]
    assert len(seqs) == HISTORY_LEN > PAGE_ROWS  # trimmed to the cap, over two pages
    assert seqs == list(range(151, HISTORY_LEN + 151))
    assert rows[0]["cursor"] == "history/amr-big/0/151"
    assert ndjson(api, "history", robot_id="amr-big", limit=3)[-1]["seq"] == 153


def test_csv_parses_back_to_the_same_values(api: TestClient[Any], written: Written) -> None:
    for kind in ("history", "stats", "alerts"):
        r = api.get(f"/v1/export/{kind}", params={"format": "csv"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/csv; charset=utf-8"
        assert r.headers["content-disposition"] == (
            f'attachment; filename="fleetpulse-{kind}-fleet.csv"'
        )
        assert b"\r\n" in r.content  # RFC 4180 line ends
        parsed = list(csv.DictReader(io.StringIO(r.content.decode(), newline="")))
        rows = ndjson(api, kind)
        assert [p["cursor"] for p in parsed] == [row["cursor"] for row in rows]
        for p, want in zip(parsed, written.rows(kind), strict=True):
            assert back(p, want) == want, p
    header = api.get("/v1/export/history?format=csv").content.split(b"\r\n")[0].decode()
    assert header == (
        "robot_id,boot,seq,ts,status,battery,pose.x,pose.y,pose.theta,speed,errors,site,cursor"
    )
    # The Accept header chooses CSV when format is not given.
    accepted = api.get("/v1/export/alerts", headers={"Accept": "text/csv"})
    assert accepted.headers["content-type"] == "text/csv; charset=utf-8"


def back(row: dict[str, str], like: dict[str, Any]) -> dict[str, Any]:
    """A CSV row as the item's JSON object, typed like ``like`` (nested keys rebuilt)."""
    out: dict[str, Any] = {}
    for column, text in row.items():
        if column == "cursor":
            continue
        path = column.split(".")
        want: Any = like
        for key in path:
            want = want[key]
        if isinstance(want, bool):
            value: Any = text == "true"
        elif isinstance(want, int):
            value = int(text)
        elif isinstance(want, float):
            value = float(text)
        elif isinstance(want, list):
            value = text.split(";") if text else []
        elif want is None:
            value = None if text == "" else text
        else:
            value = text
        target = out
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
    return out


# --- cursors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["history", "stats", "alerts"])
def test_resuming_after_any_row_gives_the_rest_exactly(
    api: TestClient[Any], written: Written, kind: str
) -> None:
    rows = ndjson(api, kind)
    assert len(rows) > 10
    # Every robot boundary, the page boundary of the long history, the first and the last.
    picks = {0, len(rows) - 1} | {
        i for i in range(1, len(rows)) if rows[i]["robot_id"] != rows[i - 1]["robot_id"]
    }
    picks |= {i - 1 for i in picks if i > 0}
    big = [i for i, r in enumerate(rows) if r["robot_id"] == "amr-big"]
    if kind == "history":
        picks |= {big[0] + PAGE_ROWS - 2, big[0] + PAGE_ROWS - 1, big[0] + PAGE_ROWS}
    for k in sorted(picks):
        assert ndjson(api, kind, cursor=rows[k]["cursor"]) == rows[k + 1 :], k
    # Pages of `limit` rows, each resumed from the last row of the one before.
    got: list[dict[str, Any]] = []
    cursor: dict[str, str] = {}
    for _ in range(1000):
        page = ndjson(api, kind, limit=13, **cursor)
        got += page
        if not page:
            break
        cursor = {"cursor": page[-1]["cursor"]}
    assert got == rows
    # A cursor resumes within a robot's or a site's export too.
    south = ndjson(api, kind, site="south")
    assert ndjson(api, kind, site="south", cursor=south[2]["cursor"]) == south[3:]
    one = ndjson(api, kind, robot_id="amr-3")
    assert ndjson(api, kind, robot_id="amr-3", cursor=one[1]["cursor"]) == one[2:]


def test_a_history_cursor_survives_new_reports_and_trimming(
    api: TestClient[Any], fleet: Fleet, written: Written
) -> None:
    before = ndjson(api, "history", robot_id="amr-big")
    seqs = [r["seq"] for r in before]
    k = 100  # sent up to seq 251
    # 40 new reports push 40 old ones off the capped list: positions all shift.
    for seq in range(HISTORY_LEN + 151, HISTORY_LEN + 191):
        fleet.write([live("amr-big", seq, site="north")])
    after = ndjson(api, "history", robot_id="amr-big", cursor=before[k]["cursor"])
    assert [r["seq"] for r in after] == [
        *seqs[k + 1 :],
        *range(HISTORY_LEN + 151, HISTORY_LEN + 191),
    ]
    # A cursor whose report was trimmed since: everything held is newer, all of it comes.
    trimmed = ndjson(api, "history", robot_id="amr-big", cursor=before[10]["cursor"])
    assert [r["seq"] for r in trimmed] == list(range(191, HISTORY_LEN + 191))


def test_stats_and_alert_cursors_take_new_rows_after_them_only(
    api: TestClient[Any], fleet: Fleet, written: Written
) -> None:
    stats = ndjson(api, "stats", robot_id="amr-2")
    alerts = ndjson(api, "alerts", robot_id="amr-2")
    # Resume after an early row of each, once a window and an alert were written after
    # the cursor's row and once one was written before it (late): only the first comes.
    late_w = msgspec.structs.replace(window("amr-2", 0), part=2)  # minute 0, a third part
    new_w = window("amr-2", 30)
    late_a, new_a = alert("amr-2", "estop", 0), alert("amr-2", "estop", 50)
    fleet.writer.write([], [late_w, new_w], [late_a, new_a])
    assert stats[2]["window_start"] == "2025-06-01T12:01:00Z"  # after minute 0's parts
    got = ndjson(api, "stats", robot_id="amr-2", cursor=stats[2]["cursor"])
    assert items(got) == [*items(stats[3:]), msgspec.to_builtins(new_w)]
    got = ndjson(api, "alerts", robot_id="amr-2", cursor=alerts[1]["cursor"])
    assert items(got) == [*items(alerts[2:]), msgspec.to_builtins(new_a)]
    # From the start, both are in their places.
    assert msgspec.to_builtins(late_w) in items(ndjson(api, "stats", robot_id="amr-2"))[:4]
    assert items(ndjson(api, "alerts", robot_id="amr-2"))[0] == msgspec.to_builtins(late_a)


def test_a_cursor_of_a_robot_gone_goes_on_with_the_next(
    api: TestClient[Any], written: Written
) -> None:
    rows = ndjson(api, "alerts")
    # A cursor naming a robot that is not (or no longer) there: the next id on.
    assert ndjson(api, "alerts", cursor="alerts/amr-10a/0/x") == [
        r for r in rows if r["robot_id"] > "amr-10a"
    ]


# --- errors -------------------------------------------------------------------------------------
BAD = [
    ("kind", "/v1/export/incidentz", ["kind"]),
    ("format", "/v1/export/history?format=xml", ["format"]),
    ("naive since", "/v1/export/history?since=2025-06-01T12:00:00", ["since"]),
    ("number until", "/v1/export/history?until=1700000000", ["until"]),
    (
        "until before since",
        "/v1/export/history?since=2025-06-01T12:00:00Z&until=2025-06-01T11:00:00Z",
        ["until"],
    ),
    (
        "until = since",
        "/v1/export/stats?since=2025-06-01T12:00:00Z&until=2025-06-01T12:00:00Z",
        ["until"],
    ),
    ("both robot and site", "/v1/export/history?robot_id=amr-1&site=north", ["site"]),
    ("bad robot id", "/v1/export/history?robot_id=-x", ["robot_id"]),
    ("cursor of another kind", "/v1/export/history?cursor=stats/amr-1/1/2", ["cursor"]),
    ("cursor not numeric", "/v1/export/history?cursor=history/amr-1/a/2", ["cursor"]),
    ("cursor too short", "/v1/export/alerts?cursor=alerts/amr-1", ["cursor"]),
    ("cursor bad robot", "/v1/export/alerts?cursor=alerts/~/1/x", ["cursor"]),
    ("limit 0", "/v1/export/alerts?limit=0", ["limit"]),
    ("unknown parameter", "/v1/export/alerts?robot=amr-1", ["robot"]),
]


@pytest.mark.parametrize(("url", "fields"), [pytest.param(u, f, id=i) for i, u, f in BAD])
def test_bad_input_is_a_422_naming_the_parameter(
    api: TestClient[Any], url: str, fields: list[str]
) -> None:
    r = api.get(url)
    assert r.status_code == 422, r.text
    assert r.json()["fields"] == fields
    assert r.json()["detail"].startswith(fields[0])


def test_unknown_robot_is_404_and_tokens_other_than_read_are_refused(
    api: TestClient[Any], written: Written
) -> None:
    r = api.get("/v1/export/history?robot_id=amr-404")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert api.get("/v1/export/history", headers={"Authorization": ""}).status_code == 401
    r = api.get("/v1/export/history", headers={"Authorization": "Bearer fp_nope"})
    assert r.status_code == 401
    r = api.get("/v1/export/history", headers={"Authorization": f"Bearer {INGEST}"})
    assert r.status_code == 403


def test_the_export_is_in_the_openapi_document(api: TestClient[Any]) -> None:
    op = api.get("/schema/openapi.json").json()["paths"]["/v1/export/{kind}"]["get"]
    assert set(op["responses"]) == {"200", "400", "401", "403", "404", "422", "503"}
    assert set(op["responses"]["200"]["content"]) == {"application/x-ndjson", "text/csv"}
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {
        "kind",
        "format",
        "robot_id",
        "site",
        "since",
        "until",
        "cursor",
        "limit",
    }
    assert params["kind"]["schema"]["enum"] == ["history", "stats", "alerts", "incidents"]
    assert params["limit"]["schema"]["minimum"] == 1
    assert params["since"]["schema"]["pattern"].startswith("^\\d{4}-")
    assert op["security"] == [{"bearer": []}]


@pytest.fixture
def export_schema(fleet: Fleet, written: Written) -> Iterator[Any]:
    """The app's OpenAPI document, loaded by schemathesis, on the seeded fleet."""
    app = create_app(fleet.settings, ingest=False)
    try:
        yield schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()  # the app's Redis clients, before the keys go


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_export_conforms_to_its_openapi(export_schema: Any, mode: GenerationMode) -> None:
    operation = export_schema["/v1/export/{kind}"]["GET"]
    statuses: list[int] = []

    @given(case=operation.as_strategy(mode).filter(_on_the_wire))
    @fuzzed(40)
    def check(case: Any) -> None:
        # What OpenAPI cannot say, across parameters: robot_id or site, not both; until
        # after since; a cursor of the path's kind. A schema-valid request may break one
        # (a 422 naming it); every answer must still be documented and match its schema.
        response = case.call_and_validate(
            headers={"Authorization": f"Bearer {READ}"},
            excluded_checks=[positive_data_acceptance],
        )
        statuses.append(response.status_code)
        if mode is GenerationMode.POSITIVE and response.status_code == 422:
            assert response.json()["fields"] in (["site"], ["until"], ["cursor"]), response.text

    check()
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses
    else:
        assert {401, 422} & set(statuses)


# --- the CLI over a real server and a connection that drops ------------------------------------
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class CuttingProxy:
    """A TCP proxy to ``port`` that resets its n-th connection after ``cuts[n]`` bytes
    came back from the server (no cut past the list), forwarding ``chunk`` bytes at a time
    with ``pause_s`` between them."""

    def __init__(
        self, port: int, cuts: list[int], chunk: int = 65536, pause_s: float = 0.0
    ) -> None:
        self.port, self.cuts, self.chunk, self.pause_s = port, list(cuts), chunk, pause_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            cut = self.cuts[self.connections] if self.connections < len(self.cuts) else None
            self.connections += 1
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: int | None) -> None:
        upstream = socket.socket()
        # A small receive buffer: what the proxy holds back stays little.
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        try:
            upstream.connect(("127.0.0.1", self.port))
        except OSError:
            upstream.close()
            client.close()  # the server is down: the client sees the connection closed
            return
        sent = 0
        # One thread per connection, both directions in one select loop: a socket that
        # another thread blocks on in recv() would not really close (no RST) until then.
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 30)
                if not ready:
                    break
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    upstream.sendall(data)
                if upstream in ready:
                    data = upstream.recv(self.chunk)
                    if not data:
                        break
                    if cut is not None and sent + len(data) >= cut:
                        client.sendall(data[: max(cut - sent, 0)])
                        # RST, not FIN: a dropped connection, not the end of an answer.
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                        break
                    client.sendall(data)
                    sent += len(data)
                    if self.pause_s:
                        time.sleep(self.pause_s)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.server.close()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (a granian server: its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Served:
    """A query server process (api.serve query) on a free port for ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = msgspec.structs.replace(settings, query_port=free_port(), api_workers=1)
        self.url = f"http://127.0.0.1:{self.settings.query_port}"
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        return serve_api("query", to_env(self.settings), self.settings.query_port)

    def kill(self) -> None:
        for pid in reversed(descendants(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()


@pytest.fixture
def served(fleet: Fleet) -> Iterator[Served]:
    server = Served(fleet.settings)
    try:
        yield server
    finally:
        server.stop()


def run_cli(url: str, token_file: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "api.export", *args, "--url", url, "--token-file",
         str(token_file), "--out", str(out), "--retries", "30"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_cli_writes_every_row_once_over_dropped_connections(
    served: Served, written: Written, tmp_path: Path, fmt: str
) -> None:
    token = tmp_path / "read.token"
    token.write_text(READ + "\n")
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {READ}"}) as c:
        whole = c.get("/v1/export/history", params={"format": fmt}).content
    # Cut the first three answers: inside the response head, then twice in the rows.
    proxy = CuttingProxy(served.settings.query_port, cuts=[40, len(whole) // 4, len(whole) // 3])
    try:
        out = tmp_path / f"history.{fmt}"
        cli = run_cli(proxy.url, token, out, "history", "--format", fmt)
        _, err = cli.communicate(timeout=120)
    finally:
        proxy.close()
    assert cli.returncode == 0, err
    assert out.read_bytes() == whole
    assert proxy.connections == 4
    assert "resuming after" in err
    n = len(written.rows("history"))
    assert f"wrote {n:,} rows" in err and "resumed 3 times" in err


def test_cli_survives_the_server_killed_and_restarted_mid_export(
    served: Served, fleet: Fleet, tmp_path: Path
) -> None:
    # 60,000 rows (~14 MB): more than the sockets between server and client buffer.
    write_history(fleet.client, Keys(fleet.settings.redis_prefix), 300, 200)
    token = tmp_path / "read.token"
    token.write_text(READ)
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {READ}"}) as c:
        whole = c.get("/v1/export/history", params={"format": "ndjson"}).content
    assert len(whole.splitlines()) == 60_000
    # Slow the answer down (~1.6 MB/s) so the kill lands inside it.
    proxy = CuttingProxy(served.settings.query_port, cuts=[], chunk=16384, pause_s=0.01)
    out = tmp_path / "history.ndjson"
    try:
        cli = run_cli(proxy.url, token, out, "history", "--format", "ndjson")
        deadline = time.monotonic() + 30
        while (out.stat().st_size if out.exists() else 0) < 2_000_000:
            assert time.monotonic() < deadline, "the export never got going"
            time.sleep(0.05)
        served.kill()
        assert out.stat().st_size < len(whole) // 2
        time.sleep(0.5)
        served.proc = served.start()
        _, err = cli.communicate(timeout=120)
    finally:
        proxy.close()
    assert cli.returncode == 0, err
    assert out.read_bytes() == whole
    assert "connection lost" in err and "wrote 60,000 rows" in err


def test_cli_reports_a_refusal_and_stops(served: Served, written: Written, tmp_path: Path) -> None:
    token = tmp_path / "read.token"
    token.write_text(READ)
    out = tmp_path / "x.csv"
    cli = run_cli(served.url, token, out, "stats", "--since", "2025-06-01T12:00:00")
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1
    assert "422 invalid_parameter: since: '2025-06-01T12:00:00' is not an RFC3339 time" in err
    token.write_text(INGEST)
    cli = run_cli(served.url, token, out, "stats")
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1 and "403 forbidden" in err, err


def test_a_failure_mid_stream_cuts_the_connection(served: Served, fleet: Fleet) -> None:
    # An entry that is not JSON makes a page read fail after many rows went out: the
    # client must see a cut answer (no terminating chunk), never a clean, short end.
    keys = Keys(fleet.settings.redis_prefix)
    write_history(fleet.client, keys, 300, 200)
    fleet.client.lset(keys.history("r00150"), 50, b"not json")
    rows = 0
    auth = {"Authorization": f"Bearer {READ}"}
    with (
        httpx.Client(base_url=served.url, headers=auth) as c,
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        c.stream("GET", "/v1/export/history") as r,
    ):
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            rows += chunk.count(b"\n")
    assert 0 < rows < 150 * 200


# --- a million rows -------------------------------------------------------------------------
MILLION_ROBOTS, PER_ROBOT = 10_000, 100
RSS_GROWTH_MB = 100


def write_history(client: redis.Redis, keys: Keys, robots: int, per_robot: int) -> None:
    """``robots`` robots (r00000...) x ``per_robot`` history entries, as the sink writes
    them (LPUSH of RobotReport JSON, newest at the head), every robot in the index of
    all robots; pipelined raw commands."""
    template = (
        '{"robot_id":"%s","boot":0,"seq":%d,"ts":"2025-06-01T%02d:%02d:%02dZ","status":"moving",'
        '"battery":%d.5,"pose":{"x":%d.25,"y":1.5,"theta":0.5},"speed":1.25,"errors":[],'
        '"site":"plant-1"}'
    )
    ids = [f"r{i:05d}" for i in range(robots)]
    pipe = client.pipeline(transaction=False)
    for n, rid in enumerate(ids, 1):
        entries = [
            (template % (rid, s, 12 + s // 3600, s // 60 % 60, s % 60, s % 100, s)).encode()
            for s in range(1, per_robot + 1)
        ]
        pipe.execute_command("LPUSH", keys.history(rid), *entries)
        if n % 500 == 0 or n == len(ids):
            batch = ids[(n - 1) // 500 * 500 : n]
            pipe.execute_command("ZADD", keys.all, *(x for r in batch for x in (0, r)))
            pipe.execute()
            pipe = client.pipeline(transaction=False)


class _Cur(msgspec.Struct):
    cursor: str


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_a_million_history_rows_stream_in_bounded_memory(
    stack: object, settings: Settings, fmt: str
) -> None:
    with private_fleet(settings) as fleet:
        keys = Keys(fleet.settings.redis_prefix)
        t0 = time.monotonic()
        write_history(fleet.client, keys, MILLION_ROBOTS, PER_ROBOT)
        wrote_s = time.monotonic() - t0
        server = Served(fleet.settings)
        try:
            pids = descendants(server.proc.pid)
            auth = {"Authorization": f"Bearer {READ}"}
            with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
                # Warm up (imports, the Redis clients), then take the peak so far.
                assert len(c.get("/v1/export/history?limit=1000").content.splitlines()) == 1000
                before = {p: status_kb(p, "VmHWM") for p in pids}
                dec = msgspec.json.Decoder(_Cur)
                rows, size, last_robot, per_robot = 0, 0, "", 0
                buf = b""
                t1 = time.monotonic()
                with c.stream("GET", "/v1/export/history", params={"format": fmt}) as r:
                    assert r.status_code == 200
                    for chunk in r.iter_bytes():
                        size += len(chunk)
                        lines = (buf + chunk).split(b"\n")
                        buf = lines.pop()
                        for line in lines:
                            if fmt == "ndjson":
                                cursor = dec.decode(line).cursor
                            elif line.startswith(b"robot_id,"):
                                continue  # the header row
                            else:  # no field of these rows is quoted: the cursor is last
                                cursor = line.rstrip(b"\r").rsplit(b",", 1)[1].decode()
                            _, rid, _, seq = cursor.split("/")
                            if rid != last_robot:
                                assert rid > last_robot and per_robot in (0, PER_ROBOT), rid
                                last_robot, per_robot = rid, 0
                            per_robot += 1
                            assert int(seq) == per_robot  # oldest first
                            rows += 1
                took = time.monotonic() - t1
                after = {p: status_kb(p, "VmHWM") for p in pids}
        finally:
            server.stop()
            pipe = fleet.client.pipeline(transaction=False)
            for i in range(MILLION_ROBOTS):
                pipe.unlink(keys.history(f"r{i:05d}"))
            pipe.execute()
    assert buf == b""
    assert rows == MILLION_ROBOTS * PER_ROBOT and per_robot == PER_ROBOT
    growth_mb = max(after[p] - before[p] for p in pids) / 1024
    print(
        f"\n1M history rows ({fmt}): wrote in {wrote_s:.1f}s; streamed {rows:,} rows "
        f"({size / 1e6:,.0f} MB) in {took:.1f}s = {rows / took:,.0f} rows/s; "
        f"server peak RSS {max(after.values()) / 1024:.0f} MB, growth {growth_mb:.1f} MB"
    )
    assert growth_mb < RSS_GROWTH_MB
