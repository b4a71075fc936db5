"""The API's side of the store: bounded reads of live state, history, stats, alerts.

No read walks the keyspace: robots are listed from one lexicographic index (the most
selective of the filters given) paged by a cursor, the fleet summary is a handful
of counters the writer keeps, and every loop reads a bounded number of entries.

A malformed or out-of-range argument (limit, cursor, battery_lt, a naive ``since``,
a change id) raises :class:`~fleetpulse.errors.InvalidQuery` naming the parameter.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec
import redis

from fleetpulse.errors import InvalidQuery
from fleetpulse.schema import (
    STATUSES,
    Alert,
    AlertKind,
    LiveState,
    RobotReport,
    Status,
    WindowStats,
    is_robot_id,
)
from fleetpulse.settings import Settings
from state.keys import Keys, epoch_us

__all__ = [
    "MAX_PAGE",
    "MAX_SCAN",
    "AlertRaised",
    "ChangeEvent",
    "FleetSummary",
    "RedisStateReader",
    "StateChanged",
    "StateReader",
    "decode_change",
]

MAX_PAGE = 1000  # most robots / entries one call returns
MAX_SCAN = 5000  # most index entries one list_robots or alerts call examines
BATTERY_SET_MAX = 5000  # battery_lt drives the listing only if it matches at most this many

_STATUS_BY_NAME: dict[str, Status] = {s: s for s in STATUSES}
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")


class FleetSummary(msgspec.Struct, frozen=True, kw_only=True):
    """Counts over the whole fleet, kept by the writer (no robot is walked to answer)."""

    total: int
    online: int
    offline: int
    low_battery: int  # battery <= low_battery_pct when last written
    by_status: dict[Status, int]  # every status, zeros included
    by_site: dict[str, int]  # sites with at least one robot
    by_site_status: dict[str, dict[Status, int]]  # site -> status -> count (non-zero only)


class StateChanged(msgspec.Struct, frozen=True, tag="state", tag_field="type"):
    """Change-stream event: a robot's live state was applied."""

    state: LiveState


class AlertRaised(msgspec.Struct, frozen=True, tag="alert", tag_field="type"):
    """Change-stream event: a new alert."""

    alert: Alert


ChangeEvent = StateChanged | AlertRaised

_state_dec = msgspec.json.Decoder(LiveState)
_report_dec = msgspec.json.Decoder(RobotReport)
_window_dec = msgspec.json.Decoder(WindowStats)
_alert_dec = msgspec.json.Decoder(Alert)
_change_dec: msgspec.json.Decoder[ChangeEvent] = msgspec.json.Decoder(ChangeEvent)


def decode_change(payload: bytes) -> ChangeEvent:
    """Decode one change-stream payload (as returned by :meth:`StateReader.changes`)."""
    return _change_dec.decode(payload)


class StateReader(Protocol):
    """What the query API reads. Every call does bounded work."""

    def get(self, robot_id: str) -> LiveState | None:
        """The live state of one robot, or None if it never reported."""
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


def _check_limit(limit: int, name: str = "limit") -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidQuery(name, f"must be between 1 and {MAX_PAGE}, got {limit}")


def _check_since(since: datetime | None) -> None:
    # A naive time's instant would depend on the server's zone; refuse it by name.
    if since is not None and since.utcoffset() is None:
        raise InvalidQuery(
            "since",
            f"{since.isoformat()} has no UTC offset; give one, e.g. 2025-06-01T12:00:00Z",
        )


def _is_stream_id(value: str) -> bool:
    # Both parts are unsigned 64-bit in Redis; a larger number is a server-side error.
    return _STREAM_ID.fullmatch(value) is not None and all(
        int(part) < 2**64 for part in value.split("-")
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _strs(values: Iterable[Any]) -> list[str]:
    # redis-py types replies as bytes | str (| tuples with scores); ours are bytes.
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class RedisStateReader:
    """:class:`StateReader` on Redis (use a replica client to spread read load)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        """Read through ``client``; key names come from ``settings.redis_prefix``."""
        self._client = client
        self._keys = Keys(settings.redis_prefix)

    def get(self, robot_id: str) -> LiveState | None:
        """The live state of one robot, or None if it never reported."""
        raw = self._client.hget(self._keys.robot(robot_id), "state")
        return None if raw is None else _state_dec.decode(raw)

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
        _check_limit(limit)
        if cursor is not None and not is_robot_id(cursor):
            raise InvalidQuery("cursor", f"{cursor!r} is not a robot id from a previous page")
        if battery_lt is not None and not math.isfinite(battery_lt):
            raise InvalidQuery("battery_lt", f"must be a finite number, got {battery_lt!r}")
        k = self._keys
        lex = [
            key
            for key, given in (
                (k.status_index(status or ""), status is not None),
                (k.site_index(site or ""), site is not None),
                (k.online_index(bool(online)), online is not None),
            )
            if given
        ]
        pipe = self._client.pipeline(transaction=False)
        for key in lex:
            pipe.zcard(key)
        if battery_lt is not None:
            pipe.zcount(k.battery, "-inf", f"({battery_lt!r}")
        sizes = [int(n) for n in pipe.execute()]
        if any(n == 0 for n in sizes):
            return [], None
        lex_sizes = sizes[: len(lex)]
        smallest = min(lex_sizes, default=None)
        fetch: Callable[[str | None, int], list[str]]
        battery_cap = BATTERY_SET_MAX if smallest is None else min(smallest, BATTERY_SET_MAX)
        if battery_lt is not None and sizes[-1] <= battery_cap:
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
                and (battery_lt is None or (bat is not None and float(bat) < battery_lt))
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
    ) -> tuple[list[LiveState], str | None]:
        out: list[LiveState] = []
        pos = cursor
        scanned = 0
        while scanned < MAX_SCAN:
            n = min(chunk, MAX_SCAN - scanned)
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
                    out.append(_state_dec.decode(row[4]))
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
        _check_limit(limit)
        _check_since(since)
        key = self._keys.history(robot_id)
        if since is None:
            return [_report_dec.decode(v) for v in self._client.lrange(key, 0, limit - 1)]
        out: list[RobotReport] = []
        start, step = 0, max(limit, 100)
        while True:
            raw = self._client.lrange(key, start, start + step - 1)
            for value in raw:
                report = _report_dec.decode(value)
                if report.ts >= since:
                    out.append(report)
                    if len(out) == limit:
                        return out
            if len(raw) < step:
                return out
            start += step

    def stats(
        self, robot_id: str, limit: int = 60, since: datetime | None = None
    ) -> list[WindowStats]:
        """Closed windows of one robot, newest window first; ``since``: start >= since."""
        _check_limit(limit)
        _check_since(since)
        low = "-inf" if since is None else epoch_us(since)
        starts = _strs(
            self._client.zrevrangebyscore(
                self._keys.window_index(robot_id), "+inf", low, start=0, num=limit
            )
        )
        if not starts:
            return []
        raw = self._client.hmget(self._keys.windows(robot_id), starts)
        return [_window_dec.decode(v) for v in raw if v is not None]

    def summary(self) -> FleetSummary:
        """Fleet-wide counts, from the counters the writer keeps in one hash."""
        raw = {_text(f): int(v) for f, v in self._client.hgetall(self._keys.summary).items()}
        by_site: dict[str, int] = {}
        by_site_status: dict[str, dict[Status, int]] = {}
        for field, n in raw.items():
            kind, _, rest = field.partition(":")
            if kind == "site":
                by_site[rest] = n
            elif kind == "site_status":
                name, _, site = rest.partition(":")
                st = _STATUS_BY_NAME.get(name)
                if st is not None:
                    by_site_status.setdefault(site, {})[st] = n
        total, online = raw.get("total", 0), raw.get("online", 0)
        return FleetSummary(
            total=total,
            online=online,
            offline=total - online,
            low_battery=raw.get("low", 0),
            by_status={s: raw.get(f"status:{s}", 0) for s in STATUSES},
            by_site=dict(sorted(by_site.items())),
            by_site_status=dict(sorted(by_site_status.items())),
        )

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
        _check_limit(limit)
        _check_since(since)
        low = None if since is None else epoch_us(since)
        if robot_id is not None:
            return self._robot_alerts(robot_id, kind, low, limit)
        k = self._keys
        stream = k.alerts if kind is None else k.alerts_of_kind(kind)
        out: list[Alert] = []
        top, scanned = "+", 0
        while scanned < MAX_SCAN:
            n = min(max(limit, 100), MAX_SCAN - scanned)
            entries = self._client.xrevrange(stream, top, "-", count=n) or []
            for _, fields in entries:
                scanned += 1
                if not fields:
                    continue  # a deleted entry
                alert = _alert_dec.decode(fields[b"data"])
                if low is None or epoch_us(alert.at) >= low:
                    out.append(alert)
                    if len(out) == limit:
                        return out
            if len(entries) < n:
                break
            top = "(" + _strs([entries[-1][0]])[0]
        return out

    def _robot_alerts(
        self, robot_id: str, kind: AlertKind | None, low: int | None, limit: int
    ) -> list[Alert]:
        k = self._keys
        out: list[Alert] = []
        offset, n = 0, limit if kind is None else max(limit, 100)
        # The per-robot set is capped (ALERTS_PER_ROBOT), which bounds this loop.
        while True:
            ids = _strs(
                self._client.zrevrangebyscore(
                    k.robot_alert_index(robot_id),
                    "+inf",
                    "-inf" if low is None else low,
                    start=offset,
                    num=n,
                )
            )
            if not ids:
                return out
            for raw in self._client.hmget(k.robot_alerts(robot_id), ids):
                if raw is None:
                    continue  # trimmed between the two reads
                alert = _alert_dec.decode(raw)
                if kind is None or alert.kind == kind:
                    out.append(alert)
                    if len(out) == limit:
                        return out
            if len(ids) < n:
                return out
            offset += n

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
