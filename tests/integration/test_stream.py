"""GET /v1/stream: server-sent events from the change stream, resumable by Last-Event-ID.

The resume tests run the API server as users do (`python -m api.serve query`, granian,
two workers, so a reconnect may land on the other process) and read it with httpx.
Changes are written by the real sink writer; what a client receives is compared,
id by id and byte by byte, with the change stream itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import msgspec
import pytest

import api.stream
from api.app import create_app
from api.stream import ChangeHub, Subscription, event_stream, parse_event_id
from deploy.local.procs import free_port, wait_http_ready
from fleetpulse.errors import StackError
from fleetpulse.schema import STATUSES
from fleetpulse.settings import Settings, to_env
from state import Keys, decode_change
from tests.integration.test_query_api import INGEST, READ, Fleet, private_fleet
from tests.integration.test_state_contract import alert, live, read_changes

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {READ}"}


@dataclass
class Message:
    """One SSE block: an event (data set) or a bare id / retry (data None)."""

    id: str | None
    event: str | None
    data: str | None


def messages(lines: Iterator[str], comments: list[str] | None = None) -> Iterator[Message]:
    """Parse SSE lines into blocks; comment lines go to ``comments``."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line == "":
            if fields:
                data = "\n".join(fields["data"]) if "data" in fields else None
                yield Message(fields.get("id", [None])[-1], fields.get("event", [None])[-1], data)
            fields = {}
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line)
        else:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))


@pytest.fixture
def fleet(stack: object, settings: Settings) -> Iterator[Fleet]:
    with private_fleet(settings) as f:
        yield f


@contextmanager
def api_server(settings: Settings, role: str = "query", workers: int = 2) -> Iterator[str]:
    """`python -m api.serve ROLE` (query or ingest) with ``settings`` on a free port;
    yields its base URL. Its output goes to a file, shown if it does not start (a pipe
    nobody reads blocks a chatty server once full: thousands of fuzzed requests did)."""
    port = free_port()
    own = {f"{role}_port": port, "api_workers": workers, "trace_sample_ratio": 0.0}
    env = {**os.environ, **to_env(msgspec.structs.replace(settings, **own))}
    fd, name = tempfile.mkstemp(prefix=f"fleetpulse-{role}-", suffix=".log")
    log = Path(name)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.serve", role],
            env=env,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share our process group id: stopped together
        )
    finally:
        os.close(fd)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ready(f"{base}/readyz", proc, log=log)
        except StackError as exc:
            pytest.fail(f"{role} server did not become ready: {exc}")
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # an open stream holds granian's graceful stop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.unlink(missing_ok=True)


@contextmanager
def sse(
    base: str, headers: dict[str, str] | None = None, **params: str
) -> Iterator[Iterator[Message]]:
    """An open event stream; the messages iterator blocks (read timeout 20 s)."""
    with httpx.stream(
        "GET", f"{base}/v1/stream", params=params, headers={**AUTH, **(headers or {})}, timeout=20
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        yield messages(r.iter_lines())


def events(stream: Iterator[Message], n: int) -> list[Message]:
    """The next ``n`` events (messages with data)."""
    out: list[Message] = []
    while len(out) < n:
        m = next(stream)
        if m.data is not None:
            out.append(m)
    return out


def as_sent(entries: list[tuple[str, bytes]]) -> list[tuple[str, str, str]]:
    """What a client must receive for these change-stream entries: (id, event, data)."""
    return [(i, decode_change(p).__struct_config__.tag, p.decode()) for i, p in entries]  # type: ignore[misc]


def received(msgs: list[Message]) -> list[tuple[str | None, str | None, str | None]]:
    return [(m.id, m.event, m.data) for m in msgs]


def churn(fleet: Fleet, batches: int, seed: int) -> None:
    """Write ``batches`` batches of state changes and alerts, a few ms apart."""
    rng = random.Random(seed)
    seq: dict[str, int] = {}
    for b in range(batches):
        states = []
        for rid in rng.sample([f"amr-{i}" for i in range(40)], rng.randint(1, 8)):
            seq[rid] = seq.get(rid, 0) + 1
            states.append(
                live(rid, seq[rid], status=rng.choice(STATUSES), battery=rng.uniform(0, 100))
            )
        alerts = [
            alert(s.report.robot_id, "error", s.report.seq) for s in states if rng.random() < 0.3
        ]
        fleet.write(states, alerts=alerts)
        time.sleep(rng.uniform(0.005, 0.04))
        if b % 10 == 0:  # a replay: nothing new in the change stream
            fleet.write(states, alerts=alerts)


# --- over a real server -------------------------------------------------------------------------
def test_reconnect_with_last_event_id_misses_nothing_and_sees_nothing_twice(fleet: Fleet) -> None:
    fleet.write([live("before", 1)], alerts=[alert("before", "estop", 1)])
    with api_server(fleet.settings) as base:
        writer = threading.Thread(target=churn, args=(fleet, 80, 11))
        with sse(base) as stream:
            head = next(stream)
            # A new client starts at the newest entry: a bare id, no event.
            start = fleet.reader.latest_change_id()
            assert (head.id, head.data) == (start, None)
            writer.start()
            try:
                first = events(stream, 37)
            except BaseException:
                writer.join()
                raise
        # Disconnected while the writer goes on; reconnect where the client stopped.
        time.sleep(0.3)
        try:
            with sse(base, {"Last-Event-ID": first[-1].id or ""}) as stream:
                writer.join()
                last = fleet.reader.latest_change_id()
                second: list[Message] = []
                while not second or second[-1].id != last:
                    second += events(stream, 1)
        finally:
            writer.join()
    want = as_sent(read_changes(fleet.reader, start, 1000))
    assert len(want) > len(first) + 50  # most changes came after the disconnect
    assert received(first + second) == want


def test_new_client_query_parameter_and_header_resume_points(fleet: Fleet) -> None:
    fleet.write([live(f"amr-{i}", 1) for i in range(3)], alerts=[alert("amr-1", "error", 1)])
    entries = read_changes(fleet.reader, None, 100)
    ids = [i for i, _ in entries]
    assert len(ids) == 4
    with api_server(fleet.settings, workers=1) as base:
        with sse(base) as stream:
            head = next(stream)
            assert (head.id, head.event, head.data) == (ids[-1], None, None)
            fleet.write([live("amr-9", 1)])
            (got,) = events(stream, 1)
            new = read_changes(fleet.reader, ids[-1], 100)
            assert received([got]) == as_sent(new)
        with sse(base, last_event_id=ids[0]) as stream:
            assert received(events(stream, 4)) == as_sent(entries[1:] + new)
        # EventSource resends the first URL with a newer header: the header wins.
        with sse(base, {"Last-Event-ID": ids[2]}, last_event_id=ids[0]) as stream:
            assert received(events(stream, 2)) == as_sent(entries[3:] + new)
        # An id past any Redis can hold (schema-valid: 1-20 digits) is past everything:
        # no reset, no old entries, the next change.
        with sse(base, last_event_id="99999999999999999999-99999999999999999999") as stream:
            fleet.write([live("amr-10", 1)])
            (got,) = events(stream, 1)
            assert (
                got.event == "state" and got.id == read_changes(fleet.reader, new[-1][0], 10)[0][0]
            )
        # Refused before the stream starts, naming the parameter; read scope only.
        r = httpx.get(f"{base}/v1/stream", headers={**AUTH, "Last-Event-ID": "latest"})
        assert (r.status_code, r.json()["fields"]) == (422, ["Last-Event-ID"])
        assert httpx.get(f"{base}/v1/stream").status_code == 401
        r = httpx.get(f"{base}/v1/stream", headers={"Authorization": f"Bearer {INGEST}"})
        assert r.status_code == 403


# --- in process: keep-alive, disconnect, a client that falls behind --------------------------------
def test_keepalive_then_disconnect_ends_the_stream_and_unsubscribes(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api.stream, "KEEPALIVE_S", 0.2)
    hubs: list[ChangeHub] = []
    subscribe = ChangeHub.subscribe

    def spy(self: ChangeHub) -> Subscription:
        hubs.append(self)
        return subscribe(self)

    monkeypatch.setattr(ChangeHub, "subscribe", spy)
    app = create_app(fleet.settings, ingest=False)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/stream",
        "raw_path": b"/v1/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), (b"authorization", AUTH["Authorization"].encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }

    async def main() -> bytes:
        body = bytearray()
        gone = asyncio.Event()
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            body.extend(message.get("body", b""))

        async with app.lifespan():
            call = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
            while b": keep-alive" not in body:
                await asyncio.sleep(0.02)
            await anyio.to_thread.run_sync(fleet.write, [live("amr-1", 1)])
            while b"event: state" not in body:
                await asyncio.sleep(0.02)
            while body.count(b": keep-alive") < 2:
                await asyncio.sleep(0.02)
            assert hubs[0].subscribers == 1
            gone.set()
            await asyncio.wait_for(call, 5)  # the response ends once the client is gone
            assert hubs[0].subscribers == 0
        return bytes(body)

    body = asyncio.run(main())
    (entry,) = fleet.reader.changes(None, 10)
    assert body.startswith(b"retry: 2000\nid: 0-0\n\n: keep-alive\n\n")
    assert (
        b"id: %s\nevent: state\ndata: %s\n\n: keep-alive\n\n" % (entry[0].encode(), entry[1])
        in body
    )


def test_a_client_that_falls_behind_catches_up_from_redis(fleet: Fleet) -> None:
    async def main() -> tuple[list[str], bool]:
        hub = ChangeHub(fleet.reader, block_ms=100, max_pending=5)
        tail = asyncio.get_running_loop().create_task(hub.run())
        start = fleet.reader.latest_change_id()
        body: AsyncIterator[bytes] = event_stream(
            hub, fleet.reader, parse_event_id(start, "id"), new_client=True, keepalive_s=0.2
        )
        assert await body.__anext__() == b"retry: 2000\nid: %s\n\n" % start.encode()
        (sub,) = hub._subs
        seen: list[str] = []

        async def read_until(n: int) -> None:
            while len(seen) < n:
                chunk = await asyncio.wait_for(body.__anext__(), 5)
                text = chunk.decode().split("\n")
                seen.extend(m.id for m in messages(iter(text)) if m.id and m.data)

        async def write(b: int) -> None:
            await anyio.to_thread.run_sync(fleet.write, [live(f"r{i}", b) for i in range(5)])

        await write(1)
        await read_until(5)  # the client follows the live stream now
        for b in range(2, 10):  # 40 changes it does not read: more than 5 queued
            await write(b)
        deadline = time.monotonic() + 5
        while not sub.lagging and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        lagged = sub.lagging
        await read_until(45)
        await write(10)  # and it is live again afterwards
        await read_until(50)
        await body.aclose()  # type: ignore[attr-defined]
        assert hub.subscribers == 0
        await hub.stop(tail)
        return seen, lagged

    seen, lagged = asyncio.run(main())
    assert lagged  # the queue overflowed: the 40 came from a catch-up read
    assert seen == [i for i, _ in read_changes(fleet.reader, None, 1000)]


# --- a resume point the stream no longer holds: told with a reset, never skipped silently -------
CHANGES_LEN = 100  # the least Settings allows, so a test can write past it quickly


@pytest.fixture
def short_fleet(stack: object, settings: Settings) -> Iterator[Fleet]:
    """A private fleet whose change stream keeps only about CHANGES_LEN entries."""
    with private_fleet(msgspec.structs.replace(settings, changes_len=CHANGES_LEN)) as f:
        yield f


def flood(fleet: Fleet, n: int, seq: int) -> None:
    """Write ``n`` state changes (a multiple of 50) with the real writer: robots f0..f49 at ``seq``+."""
    for b in range(n // 50):
        fleet.write([live(f"f{i}", seq + b) for i in range(50)])


def stream_info(fleet: Fleet) -> dict[str, Any]:
    """XINFO STREAM of the fleet's change stream (length, entries-added, first-entry, ...)."""
    info: dict[str, Any] = fleet.client.xinfo_stream(Keys(fleet.settings.redis_prefix).changes)
    return info


def test_a_resume_id_older_than_the_retained_stream_gets_a_reset_then_live_changes(
    short_fleet: Fleet,
) -> None:
    fleet = short_fleet
    flood(fleet, 50, 1)
    old = fleet.reader.latest_change_id()  # a client has seen everything up to here
    flood(fleet, 1000, 2)
    info = stream_info(fleet)
    # MAXLEN ~ trims whole radix-tree nodes: check it really dropped the client's successors.
    assert info["entries-added"] == 1050
    assert info["length"] < 300
    oldest = info["first-entry"][0].decode()
    assert parse_event_id(old, "id") < parse_event_id(oldest, "id")
    newest = fleet.reader.latest_change_id()
    with api_server(fleet.settings, workers=1) as base:
        with sse(base, {"Last-Event-ID": old}) as stream:
            (reset,) = events(stream, 1)
            assert (reset.id, reset.event) == (newest, "reset")
            data = json.loads(reset.data or "")
            assert data == {**data, "type": "reset", "requested": old, "resume": newest}
            assert set(data) == {"type", "reason", "requested", "resume"}
            assert "reload" in data["reason"]
            # Then the live changes after the reset's id, as for any client.
            fleet.write([live("late", 1)], alerts=[alert("late", "error", 1)])
            after_reset = read_changes(fleet.reader, newest, 100)
            assert len(after_reset) == 2
            assert received(events(stream, 2)) == as_sent(after_reset)
        # The reset's id is a resume point like any other: no second reset.
        with sse(base, {"Last-Event-ID": reset.id or ""}) as stream:
            assert received(events(stream, 2)) == as_sent(after_reset)


def test_a_resume_id_still_retained_gets_no_reset(short_fleet: Fleet) -> None:
    fleet = short_fleet
    flood(fleet, 1000, 1)
    info = stream_info(fleet)
    assert info["entries-added"] - info["length"] > 700  # much was trimmed, before the oldest
    kept = read_changes(fleet.reader, None, 1000)
    assert kept[0][0] == info["first-entry"][0].decode()
    # Resuming from the oldest entry still kept: everything after it is there.
    with (
        api_server(fleet.settings, workers=1) as base,
        sse(base, {"Last-Event-ID": kept[0][0]}) as stream,
    ):
        # The first event alone first: a wrong reset would leave the rest to wait for.
        assert received(events(stream, 1)) == as_sent(kept[1:2])
        assert received(events(stream, len(kept) - 2)) == as_sent(kept[2:])


def test_a_lagging_client_overtaken_by_trimming_gets_a_reset(short_fleet: Fleet) -> None:
    fleet = short_fleet

    async def main() -> tuple[list[Message], list[Message], bool, dict[str, Any], str]:
        hub = ChangeHub(fleet.reader, block_ms=100, max_pending=5)
        tail = asyncio.get_running_loop().create_task(hub.run())
        start = fleet.reader.latest_change_id()
        body: AsyncIterator[bytes] = event_stream(
            hub, fleet.reader, parse_event_id(start, "id"), new_client=True, keepalive_s=0.2
        )
        await body.__anext__()  # retry and id
        (sub,) = hub._subs
        seen: list[Message] = []

        async def read_until(n: int) -> None:
            while len(seen) < n:
                chunk = await asyncio.wait_for(body.__anext__(), 5)
                seen.extend(m for m in messages(iter(chunk.decode().split("\n"))) if m.data)

        await anyio.to_thread.run_sync(fleet.write, [live(f"r{i}", 1) for i in range(5)])
        await read_until(5)  # following the live stream
        followed = list(seen)
        # 1000 changes it does not read: its queue overflows and the stream trims past it.
        await anyio.to_thread.run_sync(flood, fleet, 1000, 2)
        deadline = time.monotonic() + 5
        while not sub.lagging and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        lagged = sub.lagging
        info = await anyio.to_thread.run_sync(stream_info, fleet)
        newest = fleet.reader.latest_change_id()
        await read_until(6)
        await anyio.to_thread.run_sync(fleet.write, [live("late", 1)])  # live again after it
        await read_until(7)
        await body.aclose()  # type: ignore[attr-defined]
        await hub.stop(tail)
        return followed, seen[5:], lagged, info, newest

    followed, after, lagged, info, newest = asyncio.run(main())
    assert lagged
    position = followed[-1].id or ""
    assert parse_event_id(position, "id") < parse_event_id(info["first-entry"][0].decode(), "id")
    reset, late = after
    assert (reset.id, reset.event) == (newest, "reset")
    data = json.loads(reset.data or "")
    assert (data["type"], data["requested"], data["resume"]) == ("reset", position, newest)
    assert received([late]) == as_sent(read_changes(fleet.reader, newest, 100))


# --- the reader's gap rule, at its edges (entries written directly, with chosen ids) -----------
def test_resume_changes_tells_a_gap_exactly_at_the_trim_boundary(short_fleet: Fleet) -> None:
    fleet, reader = short_fleet, short_fleet.reader
    key = Keys(fleet.settings.redis_prefix).changes

    def add(ids: list[str], maxlen: int | None = CHANGES_LEN) -> None:
        pipe = fleet.client.pipeline(transaction=False)
        for i in ids:  # "<ms>-*": Redis picks the seq as XADD * does (last seq + 1 in one ms)
            pipe.xadd(key, {"data": b'{"type":"state"}'}, id=i, maxlen=maxlen, approximate=True)
        pipe.execute()

    def kept() -> list[tuple[str, bytes]]:
        return read_changes(reader, None, 1000)

    # Missing key, then a stream never trimmed: every id resumes.
    assert reader.resume_changes("0-0", 10) == ([], None)
    add(["7-*"] * 50)
    assert reader.resume_changes("0-0", 100) == (kept(), None)

    # 1000 entries in one millisecond: 1000-0 ... 1000-999; MAXLEN ~ drops whole nodes.
    fleet.client.delete(key)
    add(["1000-*"] * 1000)
    info = stream_info(fleet)
    first = parse_event_id(info["first-entry"][0].decode(), "id")
    assert info["entries-added"] == 1000
    assert info["length"] < 1000
    assert first[0] == 1000 and first[1] > 1  # so its predecessor is 1000-(seq - 1)
    assert info["max-deleted-entry-id"] == b"0-0"  # trimming does not set it
    whole = kept()
    # The newest trimmed entry: nothing after it is gone, so no reset.
    assert reader.resume_changes(f"1000-{first[1] - 1}", 1000) == (whole, None)
    assert reader.resume_changes(f"1000-{first[1]}", 1000) == (whole[1:], None)
    assert reader.resume_changes(f"1000-{first[1] - 2}", 1000) == ([], "1000-999")
    assert reader.resume_changes("0-0", 1000) == ([], "1000-999")
    assert reader.resume_changes("1000-999", 1000) == ([], None)

    # First kept entry with seq 0: what came just before it is unknown, so an older id
    # gets a reset (possibly once too often); the first kept one itself does not.
    fleet.client.delete(key)
    add([f"{ms}-*" for ms in range(1, 1001)])
    first_id = kept()[0][0]
    ms = int(first_id.split("-")[0])
    assert first_id == f"{ms}-0"
    assert reader.resume_changes(f"{ms - 1}-0", 10) == ([], "1000-0")
    assert reader.resume_changes(first_id, 1000) == (kept()[1:], None)

    # XDEL: max-deleted-entry-id says whether a deleted entry lies after the id.
    fleet.client.delete(key)
    add(["5-*"] * 10, maxlen=None)
    fleet.client.xdel(key, "5-6")
    assert reader.resume_changes("5-5", 10) == ([], "5-9")
    assert reader.resume_changes("5-6", 10) == (read_changes(reader, "5-6", 10), None)

    # Everything trimmed: only the newest id given matters.
    fleet.client.xtrim(key, maxlen=0)
    assert reader.resume_changes("5-8", 10) == ([], "5-9")
    assert reader.resume_changes("5-9", 10) == ([], None)
