"""The API's side of the store: bounded reads of live state, history, stats, alerts.

No read walks the keyspace: robots are listed from one lexicographic index (the most
selective of the filters given) paged by a cursor, the fleet summary is a handful
of counters the writer keeps, and every loop reads a bounded number of entries.

A malformed or out-of-range argument (limit, cursor, battery_lt, a naive ``since``,
a change id) raises :class:`~fleetpulse.errors.InvalidQuery` naming the parameter.

Two readers, one implementation. :class:`RedisStateReader` (redis-py, blocking) serves
every read, the change stream's blocking XREAD included;
:class:`~state.async_reader.AsyncRedisStateReader` (redis.asyncio) serves the query
routes' short reads on the event loop, so a request costs no thread hop. Both run the
reads of :mod:`state.reads`, written once as plans. What only this reader does: the
change stream, and listings with ``battery_lt``, which may be driven by the battery
index (:meth:`RedisStateReader._battery_ids`) in a few round trips.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import msgspec
import redis

from fleetpulse.alert_rules import Incident, IncidentState, Severity
from fleetpulse.errors import InvalidQuery
from fleetpulse.schema import (
    Alert,
    AlertKind,
    LiveState,
    RobotReport,
    Status,
    WindowStats,
)
from fleetpulse.settings import Settings
from state import reads
from state.keys import Keys
from state.reads import (
    MAX_PAGE,
    MAX_SCAN,
    PAGE_SCRIPT,
    Command,
    FleetSummary,
    Plan,
    Reads,
    filter_indexes,
)
from state.reads import check_limit as _check_limit
from state.reads import check_listing as _check_listing
from state.reads import state_decoder as _state_dec
from state.reads import text as _text
from state.reads import texts as _strs

__all__ = [
    "MAX_PAGE",
    "MAX_SCAN",
    "AlertRaised",
    "AsyncStateReader",
    "ChangeEvent",
    "FleetSummary",
    "IncidentChanged",
    "RedisStateReader",
    "RobotRetired",
    "StateChanged",
    "StateReader",
    "decode_change",
]

BATTERY_SET_MAX = 5000  # battery_lt drives the listing only if it matches at most this many

_STREAM_ID = re.compile(r"^\d+(-\d+)?$")

_T = TypeVar("_T")


class StateChanged(msgspec.Struct, frozen=True, tag="state", tag_field="type"):
    """Change-stream event: a robot's live state was applied."""

    state: LiveState


class AlertRaised(msgspec.Struct, frozen=True, tag="alert", tag_field="type"):
    """Change-stream event: a new alert."""

    alert: Alert


class RobotRetired(msgspec.Struct, frozen=True, tag="retired", tag_field="type"):
    """Change-stream event: a robot was retired (an admin's command, or its silence);
    it is gone from the listing, the indexes and the summary."""

    robot_id: str
    at: datetime  # arrival clock: when the retirement was appended or decided


class IncidentChanged(msgspec.Struct, frozen=True, tag="incident", tag_field="type"):
    """Change-stream event: an incident opened, was acknowledged or closed (its new
    version)."""

    incident: Incident


ChangeEvent = StateChanged | AlertRaised | RobotRetired | IncidentChanged

_change_dec: msgspec.json.Decoder[ChangeEvent] = msgspec.json.Decoder(ChangeEvent)


def decode_change(payload: bytes) -> ChangeEvent:
    """Decode one change-stream payload (as returned by :meth:`StateReader.changes`)."""
    return _change_dec.decode(payload)


class StateReader(Protocol):
    """What the query API reads. Every call does bounded work."""

    def get(self, robot_id: str) -> LiveState | None:
        """The live state of one robot, or None if it never reported."""
        ...

    def get_raw(self, robot_id: str) -> bytes | None:
        """:meth:`get` as the stored LiveState JSON, or None."""
        ...

    def list_robots(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[LiveState], str | None]:
        """Robots matching all filters after ``cursor``, in id order, and the next cursor."""
        ...

    def list_robots_raw(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[bytes], str | None]:
        """:meth:`list_robots` with each state as its stored LiveState JSON."""
        ...

    def history(
        self, robot_id: str, limit: int = 50, since: datetime | None = None
    ) -> list[RobotReport]:
        """Applied reports of one robot, newest first."""
        ...

    def stats(
        self, robot_id: str, limit: int = 60, since: datetime | None = None
    ) -> list[WindowStats]:
        """Closed windows of one robot, newest first."""
        ...

    def summary(self) -> FleetSummary:
        """Fleet-wide counts."""
        ...

    def alerts(
        self,
        robot_id: str | None = None,
        kind: AlertKind | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Alert]:
        """Alerts, newest first."""
        ...

    def incidents(
        self,
        robot_id: str | None = None,
        rule: str | None = None,
        state: IncidentState | None = None,
        severity: Severity | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Incident]:
        """Incidents from the alert rules, newest opened first."""
        ...

    def changes(
        self, after_id: str | None, count: int, block_ms: int | None = None
    ) -> list[tuple[str, bytes]]:
        """Change-stream entries after ``after_id``: (stream id, ChangeEvent JSON)."""
        ...

    def latest_change_id(self) -> str:
        """The id of the newest change-stream entry ("0-0" when empty)."""
        ...

    def resume_changes(
        self, after_id: str, count: int
    ) -> tuple[list[tuple[str, bytes]], str | None]:
        """Entries after ``after_id`` and None; or [] and where to resume if some are gone."""
        ...


class AsyncStateReader(Protocol):
    """The reads of :class:`StateReader` that the query routes await (not the change
    stream, whose reader blocks in XREAD). Same arguments, same answers."""

    async def get(self, robot_id: str) -> LiveState | None:
        """The live state of one robot, or None if it never reported."""
        ...

    async def get_raw(self, robot_id: str) -> bytes | None:
        """:meth:`get` as the stored LiveState JSON, or None."""
        ...

    async def list_robots(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[LiveState], str | None]:
        """Robots matching all filters after ``cursor``, in id order, and the next cursor."""
        ...

    async def list_robots_raw(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[bytes], str | None]:
        """:meth:`list_robots` with each state as its stored LiveState JSON."""
        ...

    async def history(
        self, robot_id: str, limit: int = 50, since: datetime | None = None
    ) -> list[RobotReport]:
        """Applied reports of one robot, newest first."""
        ...

    async def stats(
        self, robot_id: str, limit: int = 60, since: datetime | None = None
    ) -> list[WindowStats]:
        """Closed windows of one robot, newest first."""
        ...

    async def summary(self) -> FleetSummary:
        """Fleet-wide counts."""
        ...

    async def alerts(
        self,
        robot_id: str | None = None,
        kind: AlertKind | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Alert]:
        """Alerts, newest first."""
        ...

    async def incidents(
        self,
        robot_id: str | None = None,
        rule: str | None = None,
        state: IncidentState | None = None,
        severity: Severity | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Incident]:
        """Incidents from the alert rules, newest opened first."""
        ...


def _is_stream_id(value: str) -> bool:
    # Both parts are unsigned 64-bit in Redis; a larger number is a server-side error.
    return _STREAM_ID.fullmatch(value) is not None and all(
        int(part) < 2**64 for part in value.split("-")
    )


class RedisStateReader:
    """:class:`StateReader` on Redis (use a replica client to spread read load)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        """Read through ``client``; key names come from ``settings.redis_prefix``."""
        self._client = client
        self._keys = Keys(settings.redis_prefix)
        self._reads = Reads(self._keys)

    def _run(self, plan: Plan[_T]) -> _T:
        try:
            command = next(plan)
            while True:
                command = plan.send(self._round_trip(command))
        except StopIteration as done:
            answer: _T = done.value
            return answer

    def _round_trip(self, command: Command) -> Any:
        try:
            return self._client.execute_command(*command)  # type: ignore[no-untyped-call]
        except redis.exceptions.NoScriptError:
            # A restarted, flushed or failed-over server lost the script: load it, resend.
            self._client.script_load(PAGE_SCRIPT)
            return self._client.execute_command(*command)  # type: ignore[no-untyped-call]

    def get(self, robot_id: str) -> LiveState | None:
        """The live state of one robot, or None if it never reported."""
        raw = self.get_raw(robot_id)
        return None if raw is None else _state_dec.decode(raw)

    def get_raw(self, robot_id: str) -> bytes | None:
        """The robot's live state as the stored LiveState JSON, or None."""
        return self._run(self._reads.get_raw(robot_id))

    def list_robots(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[LiveState], str | None]:
        """Robots matching every filter, after ``cursor``, in robot-id order.

        Pages are driven by the smallest matching index and examine at most
        :data:`MAX_SCAN` ids, so a page can hold fewer than ``limit`` robots (even
        none) while the returned cursor is not None; None means the end. The cursor
        is the last id examined, stable under concurrent updates.
        """
        raw, next_cursor = self.list_robots_raw(status, site, online, battery_lt, cursor, limit)
        return [_state_dec.decode(s) for s in raw], next_cursor

    def list_robots_raw(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[bytes], str | None]:
        """:meth:`list_robots` with each state as its stored LiveState JSON."""
        _check_listing(limit, cursor, battery_lt)
        if battery_lt is None:
            return self._run(self._reads.listing(status, site, online, cursor, limit))
        return self._battery_listing(status, site, online, battery_lt, cursor, limit)

    def _battery_listing(
        self,
        status: Status | None,
        site: str | None,
        online: bool | None,
        battery_lt: float,
        cursor: str | None,
        limit: int,
    ) -> tuple[list[bytes], str | None]:
        k = self._keys
        lex = filter_indexes(k, status, site, online)
        pipe = self._client.pipeline(transaction=False)
        for key in lex:
            pipe.zcard(key)
        pipe.zcount(k.battery, "-inf", f"({battery_lt!r}")
        sizes = [int(n) for n in pipe.execute()]
        if any(n == 0 for n in sizes):
            return [], None
        lex_sizes = sizes[: len(lex)]
        smallest = min(lex_sizes, default=None)
        fetch: Callable[[str | None, int], list[str]]
        battery_cap = BATTERY_SET_MAX if smallest is None else min(smallest, BATTERY_SET_MAX)
        if sizes[-1] <= battery_cap:
            fetch = self._battery_ids(battery_lt)
        else:
            index = k.all if smallest is None else lex[lex_sizes.index(smallest)]
            fetch = self._lex_ids(index)
        # With at most one filter the driving index answers it fully; otherwise read
        # more ids per round trip, as some will be filtered out.
        exact = len(sizes) <= 1
        chunk = limit if exact else max(limit, 500)

        def keep(row: list[Any]) -> bool:
            st, si, on, bat = (None if v is None else _text(v) for v in row[:4])
            return (
                (status is None or st == status)
                and (site is None or si == site)
                and (online is None or on == ("1" if online else "0"))
                and bat is not None
                and float(bat) < battery_lt
            )

        return self._page(fetch, keep, cursor, limit, chunk)

    def _lex_ids(self, index: str) -> Callable[[str | None, int], list[str]]:
        def fetch(after: str | None, n: int) -> list[str]:
            start = "-" if after is None else "(" + after
            return [_text(v) for v in self._client.zrangebylex(index, start, "+", 0, n)]

        return fetch

    def _battery_ids(self, battery_lt: float) -> Callable[[str | None, int], list[str]]:
        # At most BATTERY_SET_MAX ids (checked by the caller), sorted here by id.
        raw = self._client.zrangebyscore(self._keys.battery, "-inf", f"({battery_lt!r}")
        ids = sorted(_strs(raw))

        def fetch(after: str | None, n: int) -> list[str]:
            i = 0 if after is None else bisect.bisect_right(ids, after)
            return ids[i : i + n]

        return fetch

    def _page(
        self,
        fetch: Callable[[str | None, int], list[str]],
        keep: Callable[[list[Any]], bool],
        cursor: str | None,
        limit: int,
        chunk: int,
    ) -> tuple[list[bytes], str | None]:
        out: list[bytes] = []
        pos = cursor
        scanned = 0
        while scanned < reads.MAX_SCAN:
            n = min(chunk, reads.MAX_SCAN - scanned)
            ids = fetch(pos, n)
            pipe = self._client.pipeline(transaction=False)
            for rid in ids:
                pipe.hmget(self._keys.robot(rid), "status", "site", "online", "battery", "state")
            rows: list[list[Any]] = pipe.execute() if ids else []
            for i, (rid, row) in enumerate(zip(ids, rows, strict=True)):
                scanned += 1
                pos = rid
                # The hash is the truth: an index entry may be a moment behind it.
                if row[4] is not None and keep(row):
                    out.append(row[4])
                    if len(out) == limit:
                        at_end = len(ids) < n and i == len(ids) - 1
                        return out, None if at_end else rid
            if len(ids) < n:
                return out, None
        return out, pos

    def history(
        self, robot_id: str, limit: int = 50, since: datetime | None = None
    ) -> list[RobotReport]:
        """Applied reports of one robot, newest ``(boot, seq)`` first.

        ``since`` keeps reports whose event time ``ts`` is at or after it; robot clocks
        are not trusted for order, so the whole capped history may be read.
        """
        return self._run(self._reads.history(robot_id, limit, since))

    def stats(
        self, robot_id: str, limit: int = 60, since: datetime | None = None
    ) -> list[WindowStats]:
        """Closed windows of one robot, newest window first; ``since``: start >= since."""
        return self._run(self._reads.stats(robot_id, limit, since))

    def summary(self) -> FleetSummary:
        """Fleet-wide counts, from the counters the writer keeps in one hash."""
        return self._run(self._reads.summary())

    def alerts(
        self,
        robot_id: str | None = None,
        kind: AlertKind | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Alert]:
        """Alerts, newest first; ``since`` keeps alerts whose ``at`` is at or after it.

        With ``robot_id`` the robot's alerts are read by event time (exact). Without
        it, the global (or per-kind) stream is read newest-written first and at most
        :data:`MAX_SCAN` entries are examined, so a ``since`` far back may return
        fewer alerts than exist.
        """
        return self._run(self._reads.alerts(robot_id, kind, since, limit))

    def incidents(
        self,
        robot_id: str | None = None,
        rule: str | None = None,
        state: IncidentState | None = None,
        severity: Severity | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Incident]:
        """Incidents (newest version each), newest opened first, matching every filter.

        Read from a sorted set by ``opened_at``: the robot's with ``robot_id``, the open
        ones with ``state="open"``, else the fleet's newest ``alerts_len``; other
        filters are applied to at most MAX_SCAN entries of it.
        """
        return self._run(self._reads.incidents(robot_id, rule, state, severity, since, limit))

    def changes(
        self, after_id: str | None, count: int, block_ms: int | None = None
    ) -> list[tuple[str, bytes]]:
        """Up to ``count`` change-stream entries after ``after_id``, oldest first.

        ``after_id`` None reads from the oldest retained entry; to follow only new
        changes, start from :meth:`latest_change_id`. Pass the last id returned as
        the next ``after_id`` (the SSE ``Last-Event-ID``) to resume with no gap and no
        repeat. ``block_ms`` waits that long for an entry when there is none (0 waits
        forever); None does not wait. Each payload is a :data:`ChangeEvent` as JSON.
        """
        _check_limit(count, "count")
        if after_id is not None and not _is_stream_id(after_id):
            raise InvalidQuery("after_id", f"{after_id!r} is not a stream id like 1700000000000-0")
        reply = self._client.xread(
            {self._keys.changes: after_id or "0-0"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return [(_text(entry_id), fields[b"data"]) for entry_id, fields in _entries(reply)]

    def latest_change_id(self) -> str:
        """The newest change-stream id, "0-0" when the stream is empty."""
        last = self._client.xrevrange(self._keys.changes, "+", "-", count=1)
        return _strs([last[0][0]])[0] if last else "0-0"

    def resume_changes(
        self, after_id: str, count: int
    ) -> tuple[list[tuple[str, bytes]], str | None]:
        """Up to ``count`` entries after ``after_id``, unless the stream lost some of them.

        ``(entries, None)``: the stream still holds every change after ``after_id``, and
        ``entries`` are what :meth:`changes` gives. ``([], resume)``: some change after
        ``after_id`` was removed (trimmed by ``MAXLEN ~ changes_len`` or deleted), so
        whoever holds ``after_id`` must reload its snapshot and go on after ``resume``,
        the newest id the stream has given. The check and the read are one MULTI, so
        no trim slips in between. Needs Redis 7.0+ (``XINFO STREAM`` counters).
        """
        _check_limit(count, "count")
        if not _is_stream_id(after_id):
            raise InvalidQuery("after_id", f"{after_id!r} is not a stream id like 1700000000000-0")
        pipe = self._client.pipeline(transaction=True)
        pipe.xinfo_stream(self._keys.changes)
        pipe.xread({self._keys.changes: after_id}, count=count)
        info, reply = pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(info, redis.ResponseError) and str(info) == "no such key":
            return [], None  # never written: nothing was lost
        if isinstance(info, Exception):
            raise info

        def sid(value: bytes | str) -> tuple[int, int]:
            ms, _, seq = _text(value).partition("-")
            return int(ms), int(seq or 0)

        after = sid(after_id)
        # Only XDEL sets max-deleted-entry-id: trimming leaves it alone (Redis 7.0.15 keeps
        # it at 0-0 after XADD MAXLEN ~ 100 dropped 900 of 1000 entries, and after XTRIM).
        # It answers for deleted entries; trimmed ones are all older than the first kept.
        if sid(info["max-deleted-entry-id"]) > after:
            lost = True
        elif info["entries-added"] == info["length"]:
            lost = False  # nothing was ever removed
        elif info["first-entry"] is None:
            lost = sid(info["last-generated-id"]) > after  # all removed, the newest too
        else:
            first = sid(info["first-entry"][0])
            # Every removed entry newer than `after` now lies before `first`, so one exists
            # iff the entry added just before `first` is newer than `after`. The writer's
            # ids come from XADD *, so `first` with seq > 0 directly follows (ms, seq - 1);
            # seq 0 follows an id from an earlier ms that nothing records, so a client
            # older than `first` is then told to reload (once too often if it had seen
            # exactly that entry, never a change skipped in silence).
            if after >= first:
                lost = False
            elif first[1] > 0:
                lost = after < (first[0], first[1] - 1)
            else:
                lost = True
        if lost:
            return [], _text(info["last-generated-id"])
        if not reply:
            return [], None
        return [(_text(entry_id), fields[b"data"]) for entry_id, fields in _entries(reply)], None


def _entries(reply: Any) -> Sequence[tuple[bytes, dict[bytes, bytes]]]:
    # XREAD of one stream answers [[stream, entries]] (RESP2, what connect() uses).
    return reply[0][1]  # type: ignore[no-any-return]
