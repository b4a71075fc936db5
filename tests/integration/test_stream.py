"""GET /v1/stream: server-sent events from the change stream, resumable by Last-Event-ID.

The resume tests run the API server as users do (`python -m api.serve query`, granian,
two workers, so a reconnect may land on the other process) and read it with httpx.
Changes are written by the real sink writer; what a client receives is compared,
id by id and byte by byte, with the change stream itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import httpx
import pytest

import api.stream
from api.app import create_app
from api.stream import ChangeHub, Subscription, event_stream, parse_event_id
from deploy.local.procs import free_port, wait_http_ready
from fleetpulse.errors import StackError
from fleetpulse.schema import STATUSES
from fleetpulse.settings import Settings, to_env
from state import decode_change
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
def query_server(settings: Settings, workers: int = 2) -> Iterator[str]:
    """`python -m api.serve query` on a free port; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        **to_env(settings),
        "FLEETPULSE_QUERY_PORT": str(port),
        "FLEETPULSE_API_WORKERS": str(workers),
        "FLEETPULSE_TRACE_SAMPLE_RATIO": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.serve", "query"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers share our process group id: stopped together
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ready(f"{base}/readyz", proc)
        except StackError as exc:
            pytest.fail(f"query server did not become ready: {exc}")
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # an open stream holds granian's graceful stop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


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
    with query_server(fleet.settings) as base:
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
    with query_server(fleet.settings, workers=1) as base:
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
