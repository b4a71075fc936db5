"""``GET /v1/stream``: server-sent events of state changes and alerts, resumable by id.

Each event is one entry of the change stream that the sink writes (``state.keys``)::

    id: 1732650000123-0            the Redis stream id: the resume point
    event: state                   or ``alert``, ``retired``: the ChangeEvent's type
    data: {"type":"state",...}     the ChangeEvent JSON, as the writer stored it

A client that sends ``Last-Event-ID`` (or ``?last_event_id=``; the header wins, as
a browser's EventSource resends the original URL with a newer header) gets every
entry after that id; one without it starts at the newest entry: the stream's first
message is an ``id:`` line with no data, which sets the client's last event id
without firing an event, so a reconnect resumes there even if nothing happened.
A comment line (``: keep-alive``) goes out when nothing else did for a while.

How no change is missed and none sent twice: each worker process tails the change
stream once (:class:`ChangeHub`, one blocking XREAD at a time, however many clients
listen) and fans new entries out to its subscribers. A client subscribes first and
then reads from Redis what it has not seen (its catch-up, in bounded pages) until
the stream holds nothing newer; everything the hub hands out after the subscription
reaches it too, and an entry it already sent (ids only grow) is skipped. A client
that falls behind (its queue over :data:`MAX_PENDING`) drops the queue and catches
up from Redis again, so memory per client stays bounded and nothing is lost.

A gap is told, never skipped: the change stream keeps about ``changes_len`` entries
(``XADD MAXLEN ~``), so a resume id can be older than what Redis still holds. Every
catch-up page (a reconnect with an id, and a lagging client's read) is read together
with the stream's trim state (:meth:`~state.reader.StateReader.resume_changes`, one
MULTI, no extra round trip), and when some change after the client's id is gone the
client gets one message instead of the entries that remain::

    id: 1732650099999-3            the newest change id: where the stream goes on
    event: reset
    data: {"type":"reset","reason":"...","requested":"<the client's id>","resume":"<id>"}

The client drops its state, reloads the snapshot (``GET /v1/robots``,
``/v1/fleet/summary``, ``/v1/alerts``) and applies the events that follow, which are
every change after ``resume``; a change both in the snapshot and after ``resume`` is
applied twice, which a state keyed by robot and ordered by ``(boot, seq)`` absorbs.
A client whose id is still held (the oldest kept entry included) gets no reset.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from typing import Annotated, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import redis
from litestar import get
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIType
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import Stream
from litestar.types import ControllerRouterHandler

from fleetpulse.errors import InvalidQuery
from state.reader import MAX_PAGE, StateReader

__all__ = [
    "KEEPALIVE_S",
    "SSE_HEADERS",
    "ChangeHub",
    "LastEventIdHeader",
    "LastEventIdQuery",
    "StreamBackend",
    "Subscription",
    "client_stream",
    "event_stream",
    "frame",
    "parse_event_id",
    "reset_frame",
    "stream_routes",
]

log = logging.getLogger("fleetpulse.api.stream")

KEEPALIVE_S = 15.0  # a comment after this long without a message keeps proxies from closing
RETRY_MS = 2000  # reconnect delay suggested to EventSource clients
HUB_BLOCK_MS = 1000  # how long one XREAD of the hub waits; bounds how long stop() takes
MAX_PENDING = 10_000  # entries queued for one client before it must catch up from Redis

EventId = tuple[int, int]  # (milliseconds, sequence): the order of stream ids
Entry = tuple[EventId, bytes]  # an entry's id and its whole SSE frame

_ID = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")
ID_PATTERN = r"^\d{1,20}(-\d{1,20})?$"  # the same, for the OpenAPI document
_MAX_PART = 2**64 - 1
KEEPALIVE = b": keep-alive\n\n"


class _Kind(msgspec.Struct):
    type: str


_kind_dec = msgspec.json.Decoder(_Kind)  # reads the tag only; the rest is skipped


class Reset(msgspec.Struct, frozen=True, tag="reset", tag_field="type"):
    """The data of an ``event: reset``: changes after ``requested`` are gone from Redis."""

    reason: str
    requested: str  # the id the client resumed from (or had reached, when it lagged)
    resume: str  # the message's id: the stream goes on with the changes after it


RESET_REASON = (
    "changes after the requested id are no longer kept; reload the snapshot "
    "(GET /v1/robots, /v1/fleet/summary, /v1/alerts), then apply the events after this one"
)


def parse_event_id(value: str, parameter: str) -> EventId:
    """A stream id as ``(ms, seq)``; raises InvalidQuery naming ``parameter`` if malformed."""
    match = _ID.fullmatch(value.strip())
    if match is None:
        raise InvalidQuery(
            parameter,
            f"{value!r} is not an event id from this stream; expected the `id:` of an "
            "event received before, like 1732650000123-0",
        )
    # Beyond the largest id Redis can hold: ahead of the stream (client_stream clamps it).
    return min(int(match[1]), _MAX_PART), min(int(match[2] or 0), _MAX_PART)


def _text(event_id: EventId) -> str:
    return f"{event_id[0]}-{event_id[1]}"


def frame(entry_id: str, payload: bytes) -> bytes:
    """The SSE message for one change-stream entry."""
    try:
        kind = _kind_dec.decode(payload).type
    except msgspec.DecodeError:  # not ours; pass it on rather than leave a hole in the ids
        kind = "change"
    # msgspec writes JSON on one line; split anyway, as a raw newline would end the event.
    data = b"".join(b"data: " + line + b"\n" for line in payload.splitlines())
    return b"id: %s\nevent: %s\n%s\n" % (entry_id.encode(), kind.encode(), data)


def reset_frame(requested: EventId, resume: str) -> bytes:
    """The SSE message telling a client that changes after ``requested`` were lost."""
    data = msgspec.json.encode(Reset(RESET_REASON, _text(requested), resume))
    return b"id: %s\nevent: reset\ndata: %s\n\n" % (resume.encode(), data)


class Subscription:
    """One client's queue of new entries, filled by the hub, drained by the client."""

    def __init__(self, max_pending: int) -> None:
        self._pending: deque[Entry] = deque()
        self._wake = asyncio.Event()
        self._max = max_pending
        self.attached = asyncio.Event()  # the hub holds a position: new entries will come here
        self.lagging = False  # entries were dropped: read them from Redis
        self.closed = False  # the server is stopping

    def offer(self, entries: Sequence[Entry]) -> None:
        """Queue entries (called by the hub); on overflow drop them all and mark lagging."""
        if self.lagging or self.closed:
            return
        if len(self._pending) + len(entries) > self._max:
            self._pending.clear()
            self.lagging = True
        else:
            self._pending.extend(entries)
        self._wake.set()

    def restart(self) -> None:
        """Forget what is queued, before a catch-up read from Redis replaces it."""
        self._pending.clear()
        self.lagging = False

    def close(self) -> None:
        """End the client's stream (server shutdown)."""
        self.closed = True
        self._wake.set()

    async def next(self, timeout: float) -> list[Entry]:
        """Entries queued since the last call; empty after ``timeout`` or when woken by a flag."""
        if not self._pending and not self.lagging and not self.closed:
            with anyio.move_on_after(timeout):
                await self._wake.wait()
        else:
            await anyio.lowlevel.checkpoint()  # never starve the loop, whatever the caller does
        self._wake.clear()
        out = list(self._pending)
        self._pending.clear()
        return out


class ChangeHub:
    """One tail of the change stream per process, fanned out to every subscribed client.

    The hub reads only while someone listens; when the last client leaves it stops,
    and the next subscriber restarts it from the newest entry (its own catch-up
    covers what came before).
    """

    def __init__(
        self,
        reader: StateReader,
        *,
        block_ms: int = HUB_BLOCK_MS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        """Tail through ``reader``; one blocking XREAD of at most ``block_ms`` at a time."""
        self._reader = reader
        self._block_ms = block_ms
        self._max_pending = max_pending
        self._subs: set[Subscription] = set()
        self._last: str | None = None  # the hub's position; None while idle
        self._wakeup = asyncio.Event()
        self._stopping = False

    @property
    def subscribers(self) -> int:
        """How many clients are listening (for tests and metrics)."""
        return len(self._subs)

    def subscribe(self) -> Subscription:
        """Add a client; wait for ``sub.attached`` before its catch-up read."""
        sub = Subscription(self._max_pending)
        if self._stopping:
            sub.close()
            return sub
        self._subs.add(sub)
        if self._last is not None:
            # The hub will hand out every entry after its position; the ones up to it
            # are already in Redis, where the client's catch-up finds them.
            sub.attached.set()
        self._wakeup.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove a client (its stream ended or it disconnected)."""
        self._subs.discard(sub)

    async def run(self) -> None:
        """Tail the change stream until :meth:`stop`; Redis errors are retried with backoff."""
        # Its own thread for the blocking XREAD, so it never takes one of the request threads.
        limiter = anyio.CapacityLimiter(1)
        delay = 0.5
        while not self._stopping:
            if not self._subs:
                self._last = None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                if self._last is None:
                    self._last = await anyio.to_thread.run_sync(self._reader.latest_change_id)
                for sub in self._subs:
                    sub.attached.set()
                page = await anyio.to_thread.run_sync(
                    partial(self._reader.changes, self._last, MAX_PAGE, self._block_ms),
                    limiter=limiter,
                )
                delay = 0.5
            except Exception as exc:  # the tail must outlive any one failure
                if isinstance(exc, redis.RedisError):
                    log.warning("reading the change stream failed (%s); retry in %.1fs", exc, delay)
                else:
                    log.exception("the change-stream tail failed; retry in %.1fs", delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if page:
                self._last = page[-1][0]
                entries = [(parse_event_id(i, "id"), frame(i, p)) for i, p in page]
                for sub in list(self._subs):
                    sub.offer(entries)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End every client's stream and the tail ``task`` (within about one XREAD block)."""
        self._stopping = True
        for sub in list(self._subs):
            sub.close()
        self._wakeup.set()
        try:
            await asyncio.wait_for(task, timeout=self._block_ms / 1000 + 5)
        except TimeoutError:  # pragma: no cover - a Redis call hung; wait_for cancelled it
            log.warning("the change-stream tail did not stop in time")


async def _catch_up(reader: StateReader, after: EventId) -> AsyncIterator[tuple[EventId, bytes]]:
    """Everything in Redis after ``after``, in pages of MAX_PAGE, until nothing is newer.

    Where Redis no longer holds every change after the position, a reset message
    takes the page's place and the catch-up goes on after the reset's id. Each page
    is checked, not only the first: a trim can overtake a slow catch-up between pages.
    """
    last = after
    while True:
        page, resume = await anyio.to_thread.run_sync(
            partial(reader.resume_changes, _text(last), MAX_PAGE)
        )
        if resume is not None:
            log.info("changes after %s are no longer kept; reset to %s", _text(last), resume)
            chunk = reset_frame(last, resume)
            last = parse_event_id(resume, "id")
            yield last, chunk
            continue
        if page:
            last = parse_event_id(page[-1][0], "id")
            yield last, b"".join(frame(i, p) for i, p in page)
        if len(page) < MAX_PAGE:
            return


async def event_stream(
    hub: ChangeHub,
    reader: StateReader,
    after: EventId,
    *,
    new_client: bool,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """The SSE body for one client: every change after ``after``, then live ones.

    Ends when the server stops or Redis fails (the client reconnects with its last
    id); a client disconnect cancels it, which unsubscribes it.
    """
    sub = hub.subscribe()
    try:
        head = b"retry: %d\n" % RETRY_MS
        if new_client:
            head += b"id: %s\n" % _text(after).encode()
        yield head + b"\n"
        while not sub.attached.is_set() and not sub.closed:
            with anyio.move_on_after(keepalive_s) as waited:
                await sub.attached.wait()
            if waited.cancelled_caught:
                yield KEEPALIVE
        last = after
        catch_up = True
        while not sub.closed:
            if catch_up or sub.lagging:
                sub.restart()
                async for upto, chunk in _catch_up(reader, last):
                    last = upto
                    yield chunk
                catch_up = False
            entries = await sub.next(keepalive_s)
            fresh = [e for e in entries if e[0] > last]
            if fresh:
                last = fresh[-1][0]
                yield b"".join(f for _, f in fresh)
            elif not entries and not sub.lagging and not sub.closed:
                yield KEEPALIVE
    except redis.RedisError as exc:
        log.warning("change stream read failed (%s); ending the event stream", exc)
    finally:
        hub.unsubscribe(sub)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def client_stream(
    backend: StreamBackend, header: str | None, query: str | None
) -> AsyncIterator[bytes]:
    """The event stream for a client that sent ``Last-Event-ID`` ``header`` and/or
    ``last_event_id`` ``query`` (the header wins; neither: from the newest entry).
    Raises InvalidQuery for a malformed id, before anything is sent."""
    reader = backend.reader
    latest = parse_event_id(await anyio.to_thread.run_sync(reader.latest_change_id), "id")
    # Both are checked when both are given: a malformed id is refused even where the
    # other one wins (the document states the form of each).
    given = {"Last-Event-ID": header, "last_event_id": query}
    ids = {name: parse_event_id(value, name) for name, value in given.items() if value is not None}
    after = ids.get("Last-Event-ID", ids.get("last_event_id", latest))
    # An id ahead of the newest entry (from another Redis, or made up) would wait for
    # entries that may never come: it resumes at the newest entry instead. (An empty
    # stream keeps the id: its trim state tells whether changes after it were lost.)
    if latest > (0, 0):
        after = min(after, latest)
    return event_stream(
        backend.hub,
        reader,
        after,
        new_client=header is None and query is None,
        keepalive_s=KEEPALIVE_S,  # read per request, so tests can shorten it
    )


# The id's form, documented (parse_event_id checks it). A string, not Litestar's
# "string or null" for an optional parameter: a query or header value cannot be null,
# and a client sending the text "null" (schemathesis did, from that document) gets a 422.
_ID_SCHEMA = {"pattern": ID_PATTERN, "one_of": None, "type": OpenAPIType.STRING}

LastEventIdQuery = Annotated[
    str | None,
    QueryParameter(
        description="Resume after this event id (for clients that cannot set the "
        "Last-Event-ID header); the header wins when both are given.",
        max_length=41,
        schema_extra=_ID_SCHEMA,
    ),
]
LastEventIdHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        description="Resume after this event id (sent by EventSource on reconnect).",
        required=False,
        max_length=41,
        schema_extra=_ID_SCHEMA,
    ),
]


class StreamBackend(Protocol):
    """Where the route finds the reader and the hub (made when the app starts)."""

    @property
    def reader(self) -> StateReader:
        """The state reader."""
        ...

    @property
    def hub(self) -> ChangeHub:
        """This process's change-stream tail."""
        ...


_DESCRIPTION = """\
One event per change-stream entry: `id:` is the Redis stream id, `event:` is `state`,
`alert` or `retired`, `data:` the change as JSON (`{"type": "state", "state":
LiveState}`, `{"type": "alert", "alert": Alert}`, or `{"type": "retired", "robot_id":
"amr-7", "at": RFC 3339}` when a robot was retired: it is gone from the listing and the
summary). Send `Last-Event-ID` (or `last_event_id`) to resume after an event with no gap
and no repeat; without it the stream starts at the newest entry, and its first message
is an `id:` line without data that gives the client its resume point. `: keep-alive`
comments keep idle connections open.

Redis keeps the newest `changes_len` changes or so. When some change after the
resume id is no longer kept (the client was away too long, or fell too far behind
while connected), the client gets `event: reset` instead of the changes that remain:
`id:` is the newest change id, `data:` is `{"type": "reset", "reason": text,
"requested": the client's id, "resume": the new id}`. The client must drop what it
holds, reload the snapshot (`GET /v1/robots`, `/v1/fleet/summary`, `/v1/alerts`) and
apply the events that follow: every change after `resume`. An id still kept never
gets a reset.
"""


def stream_routes(
    backend: StreamBackend, responses: Mapping[int, ResponseSpec] | None = None
) -> list[ControllerRouterHandler]:
    """``GET /v1/stream``, reading through ``backend``; ``responses``: its error answers."""

    @get(
        "/v1/stream",
        summary="Live state changes and alerts (server-sent events)",
        media_type="text/event-stream",
        description=_DESCRIPTION,
        responses=dict(responses or {}),
    )
    async def stream(
        last_event_id: LastEventIdQuery = None,
        last_event_id_header: LastEventIdHeader = None,
    ) -> Stream:
        """Server-sent events, one per change-stream entry; resumable with Last-Event-ID."""
        body = await client_stream(backend, last_event_id_header, last_event_id)
        return Stream(body, media_type="text/event-stream", headers=SSE_HEADERS)

    return [stream]
