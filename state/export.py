"""Export reads: every row of one kind for a robot, a site or the fleet, in pages.

An export walks robots in id order (the one robot, or ``P:idx:site:<site>`` /
``P:idx:all`` read in ZRANGEBYLEX pages) and, per robot, its rows **oldest first**:

    history  the robot's history list from its tail (oldest) to its head: applied order,
             ``(boot, seq)`` within an ordering generation (state.writer)
    stats    closed windows by start, then window name (a reopened minute's parts)
    alerts   alerts by event time ``at``, then alert id

Only a bounded number of rows is held at once: robots are read :data:`ROBOTS_AT_ONCE`
at a time (their first pages in one pipelined round trip), each robot's rows in pages
of at most :data:`PAGE_ROWS`. The time range ``[since, until)`` is on event time: a
report's ``ts``, a window's start, an alert's ``at``.

**Cursors.** Every row carries the cursor that resumes *after* it::

    <kind>/<robot id>/<boot>/<seq>        history
    <kind>/<robot id>/<score>/<member>    stats (window start µs, window name), alerts
                                          (event time µs, alert id)

It names the row by its own order key, never by its position: a history list is capped
and newest-first, so positions shift as reports arrive. Resuming with row k's cursor
gives rows k+1.. exactly when the data did not change meanwhile. When it did:

- a new row of a robot not yet reached, or newer than the cursor's row of the cursor's
  robot, is included; one of a robot already passed is not (robots come in id order);
- history: if the cursor's report was trimmed off the capped list since, every report
  still held is newer than it, and all are sent (none was sent before);
- stats and alerts: rows older than the cursor's key are never sent again, even if one
  was written late (a window or alert is stored by its own time, not its arrival);
- a robot retired meanwhile is gone, and the export goes on with the next id.

After an operator's order reset (``POST /v1/robots/{id}/reset-order``) a robot may
report a ``(boot, seq)`` its history already holds; a cursor on such a report resumes
after its oldest copy (the one thing a ``(boot, seq)`` cursor cannot tell apart).

The per-kind reads are plans (:mod:`state.reads`): generators of Redis commands, run by
:class:`~state.async_reader.AsyncRedisStateReader` on the event loop, where concurrent
plans' commands go out in one pipeline. Adding a kind is one :class:`Kind` in
:data:`KINDS`: its schema, its per-robot page read and its cursor's form.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from fleetpulse.alert_rules import Incident
from fleetpulse.errors import InvalidQuery
from fleetpulse.schema import Alert, RobotReport, WindowStats, is_robot_id
from state.keys import Keys, epoch_us
from state.reads import Plan, check_since, texts

__all__ = [
    "KINDS",
    "PAGE_ROWS",
    "ROBOTS_AT_ONCE",
    "Cursor",
    "Kind",
    "Range",
    "Row",
    "Runner",
    "export_rows",
    "parse_cursor",
    "time_range",
]

PAGE_ROWS = 200  # most rows one read of one robot returns
ROBOTS_AT_ONCE = 32  # robots whose first page is read in one round trip
_NO_LIMIT = -1

# Runs a plan and returns its answer (AsyncRedisStateReader.run).
Runner = Callable[[Plan[Any]], Awaitable[Any]]


class Row(NamedTuple):
    """One exported item: the stored JSON and the cursor that resumes after it."""

    robot_id: str
    cursor: str
    raw: bytes


class Range(NamedTuple):
    """Event time ``[since_us, until_us)`` in µs since the epoch; None: open."""

    since_us: int | None
    until_us: int | None

    def holds(self, us: int) -> bool:
        return (self.since_us is None or us >= self.since_us) and (
            self.until_us is None or us < self.until_us
        )


_OPEN = Range(None, None)


def time_range(since: datetime | None, until: datetime | None) -> Range:
    """The range of ``since``/``until``; InvalidQuery naming the parameter when one has no
    offset, or ``until`` is not after ``since``."""
    check_since(since)
    if until is not None and until.utcoffset() is None:
        raise InvalidQuery(
            "until",
            f"{until.isoformat()} has no UTC offset; give one, e.g. 2025-06-01T13:00:00Z",
        )
    low = None if since is None else epoch_us(since)
    high = None if until is None else epoch_us(until)
    if since is not None and until is not None and until <= since:
        raise InvalidQuery(
            "until",
            f"must be after since ({since.isoformat()}), got {until.isoformat()}; "
            "the range is [since, until)",
        )
    return Range(low, high)


# --- marks: where a robot's rows go on -------------------------------------------------------
class _HistMark(NamedTuple):
    """A history entry by ``(boot, seq)``, and where it was counted from the list's
    tail (0 = the oldest), None when unknown (a cursor's)."""

    boot: int
    seq: int
    at: int | None


class _ScoreMark(NamedTuple):
    """An index member and its score; ``width``: how many members of that score the
    next read must be able to skip (grows if a read returned only skipped ones)."""

    score: int
    member: bytes
    width: int


Mark = _HistMark | _ScoreMark
Page = tuple[list[Row], Mark | None]  # rows, and where to go on (None: the robot is done)


class _Order(msgspec.Struct):
    """The fields of a stored RobotReport that place it (decoded without the rest)."""

    seq: int
    ts: datetime
    boot: int = 0


_order_dec = msgspec.json.Decoder(_Order)


def _history_page(
    keys: Keys, kind: str, rid: str, mark: Mark | None, size: int, window: Range
) -> Plan[Page]:
    key = keys.history(rid)

    def rows_of(raw: list[bytes], first_at: int, short: bool) -> Page:
        out: list[Row] = []
        last: _Order | None = None
        for value in raw:
            last = _order_dec.decode(value)
            if window.holds(epoch_us(last.ts)):
                out.append(Row(rid, f"{kind}/{rid}/{last.boot}/{last.seq}", value))
        if short:
            return out, None
        if last is None:  # the mark ended a full page: go on from it
            assert isinstance(mark, _HistMark)
            return out, mark._replace(at=first_at - 1)
        return out, _HistMark(last.boot, last.seq, first_at + len(raw) - 1)

    if isinstance(mark, _HistMark) and mark.at is not None:
        # The page after the mark, with the mark itself as its first entry: if it is
        # still there, nothing moved (a trim at the tail would shift every position).
        raw = yield ("LRANGE", key, -(mark.at + size + 1), -(mark.at + 1))
        raw.reverse()  # oldest first
        if raw and _placed(raw[0], mark):
            return rows_of(raw[1:], mark.at + 1, len(raw) < size + 1)
    if isinstance(mark, _HistMark):
        # Find the mark from the tail on; it can only have moved toward the tail.
        start = 0
        while True:
            raw = yield ("LRANGE", key, -(start + size), -(start + 1))
            raw.reverse()
            for i, value in enumerate(raw):
                if _placed(value, mark):
                    return rows_of(raw[i + 1 :], start + i + 1, len(raw) < size)
            if len(raw) < size:
                break  # gone: trimmed, so every entry still held is newer than it
            start += size
    raw = yield ("LRANGE", key, -size, -1)
    raw.reverse()
    return rows_of(raw, 0, len(raw) < size)


def _placed(value: bytes, mark: _HistMark) -> bool:
    order = _order_dec.decode(value)
    return order.boot == mark.boot and order.seq == mark.seq


def _scored_page(
    index_key: Callable[[Keys, str], str], hash_key: Callable[[Keys, str], str]
) -> Callable[[Keys, str, str, Mark | None, int, Range], Plan[Page]]:
    """The page read of a kind kept as a hash of JSON plus a zset of its members by time."""

    def page(
        keys: Keys, kind: str, rid: str, mark: Mark | None, size: int, window: Range
    ) -> Plan[Page]:
        low: int | str = "-inf" if window.since_us is None else window.since_us
        skip = 0
        if isinstance(mark, _ScoreMark):
            low = mark.score if isinstance(low, str) else max(low, mark.score)
            skip = mark.width
        high = "+inf" if window.until_us is None else f"({window.until_us}"
        reply = yield (
            "ZRANGEBYSCORE", index_key(keys, rid), low, high, "WITHSCORES", "LIMIT", 0, size + skip,
        )  # fmt: skip
        pairs = _score_pairs(reply)
        if isinstance(mark, _ScoreMark):
            # Equal scores come in member order (memcmp, as bytes compare).
            after = [p for p in pairs if (p[1], p[0]) > (mark.score, mark.member)]
        else:
            after = pairs
        short = len(pairs) < size + skip
        if not after:
            if short or not isinstance(mark, _ScoreMark):
                return [], None
            # A full read of members at the mark's score, all at or before it: read wider.
            return [], mark._replace(width=mark.width + size)
        values = yield ("HMGET", hash_key(keys, rid), *(m.decode() for m, _ in after))
        out = [
            Row(rid, f"{kind}/{rid}/{score}/{member.decode()}", value)
            for (member, score), value in zip(after, values, strict=True)
            if value is not None  # trimmed between the two reads
        ]
        if short:
            return out, None
        member, score = after[-1]
        width = sum(1 for _, s in pairs if s == score)
        return out, _ScoreMark(score, member, width)

    return page


def _score_pairs(reply: list[Any]) -> list[tuple[bytes, int]]:
    """ZRANGEBYSCORE ... WITHSCORES as (member, score) pairs: redis-py hands it on flat
    or already paired, depending on the client and protocol."""
    if reply and isinstance(reply[0], list | tuple):
        return [(_as_bytes(m), int(float(sc))) for m, sc in reply]
    return [(_as_bytes(reply[i]), int(float(reply[i + 1]))) for i in range(0, len(reply), 2)]


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _history_mark(a: str, b: str) -> Mark:
    return _HistMark(int(a), int(b), None)


def _score_mark(a: str, b: str) -> Mark:
    return _ScoreMark(int(a), b.encode(), 1)


class Kind(NamedTuple):
    """One kind of export: its rows' schema, its page read and its cursor's form."""

    item: type[msgspec.Struct]  # what each row's stored JSON is (CSV columns, docs)
    order: str  # how one robot's rows are ordered, for people
    page: Callable[[Keys, str, str, Mark | None, int, Range], Plan[Page]]
    mark: Callable[[str, str], Mark]  # a cursor's last two parts -> where to go on
    marks: str  # the cursor's last two parts, for people


KINDS: Mapping[str, Kind] = {
    "history": Kind(
        RobotReport,
        "applied order, oldest first; in range by ts",
        _history_page,
        _history_mark,
        "<boot>/<seq>",
    ),
    "stats": Kind(
        WindowStats,
        "window start, oldest first; in range by window_start",
        _scored_page(Keys.window_index, Keys.windows),
        _score_mark,
        "<window start µs>/<window name>",
    ),
    "alerts": Kind(
        Alert,
        "event time (at), oldest first; in range by at",
        _scored_page(Keys.robot_alert_index, Keys.robot_alerts),
        _score_mark,
        "<at µs>/<alert id>",
    ),
    "incidents": Kind(
        Incident,
        "opened_at, oldest first (each as its newest version); in range by opened_at",
        _scored_page(Keys.robot_incident_index, Keys.robot_incidents),
        _score_mark,
        "<opened_at µs>/<incident id>",
    ),
}


# --- cursors and the walk over robots --------------------------------------------------------
class Cursor(NamedTuple):
    """Where an export resumes: after ``mark`` of robot ``robot_id``."""

    robot_id: str
    mark: Mark


def parse_cursor(kind: str, text: str) -> Cursor:
    """The cursor of a row of ``kind``; InvalidQuery naming ``cursor`` when it is not one."""
    spec = KINDS[kind]
    parts = text.split("/", 3)
    form = f"{kind}/<robot id>/{spec.marks}"
    if len(parts) != 4 or parts[0] != kind or not is_robot_id(parts[1]):
        raise InvalidQuery("cursor", f"{text[:80]!r} is not a cursor of a {kind} row ({form})")
    try:
        mark = spec.mark(parts[2], parts[3])
    except ValueError:
        raise InvalidQuery(
            "cursor", f"{text[:80]!r} is not a cursor of a {kind} row ({form})"
        ) from None
    return Cursor(parts[1], mark)


def _robots(keys: Keys, index: str, after: str | None, inclusive: bool, n: int) -> Plan[list[str]]:
    start = "-" if after is None else ("[" if inclusive else "(") + after
    ids = yield ("ZRANGEBYLEX", index, start, "+", "LIMIT", 0, n)
    return texts(ids)


async def export_rows(
    run: Runner,
    keys: Keys,
    kind: str,
    *,
    robot_id: str | None = None,
    site: str | None = None,
    window: Range = _OPEN,
    cursor: Cursor | None = None,
    limit: int | None = None,
) -> AsyncIterator[list[Row]]:
    """The rows of ``kind`` in export order, a page at a time (see the module's doc).

    ``robot_id``: that robot only; ``site``: the robots of that site; neither: the fleet.
    ``run`` runs a plan (:meth:`~state.async_reader.AsyncRedisStateReader.run`).
    """
    spec = KINDS[kind]
    left = _NO_LIMIT if limit is None else limit
    if left == 0:
        return

    def first(rid: str) -> Mark | None:
        return cursor.mark if cursor is not None and rid == cursor.robot_id else None

    async def one(rid: str, page: Page) -> AsyncIterator[list[Row]]:
        rows, mark = page
        while True:
            if rows:
                yield rows
            if mark is None:
                return
            rows, mark = await run(spec.page(keys, kind, rid, mark, PAGE_ROWS, window))

    async def pages_of(ids: list[str]) -> AsyncIterator[list[Row]]:
        # The first page of each robot together (one pipeline), then each robot's rest.
        firsts: list[Page] = await asyncio.gather(
            *(run(spec.page(keys, kind, rid, first(rid), PAGE_ROWS, window)) for rid in ids)
        )
        for rid, page in zip(ids, firsts, strict=True):
            async for rows in one(rid, page):
                yield rows

    async def walk() -> AsyncGenerator[list[Row], None]:
        if robot_id is not None:
            if cursor is None or cursor.robot_id <= robot_id:
                async for rows in pages_of([robot_id]):
                    yield rows
            return
        index = keys.all if site is None else keys.site_index(site)
        after, inclusive = (None, False) if cursor is None else (cursor.robot_id, True)
        while True:
            ids = await run(_robots(keys, index, after, inclusive, ROBOTS_AT_ONCE))
            if not ids:
                return
            async for rows in pages_of(ids):
                yield rows
            if len(ids) < ROBOTS_AT_ONCE:
                return
            after, inclusive = ids[-1], False

    async with aclosing(walk()) as pages:
        async for rows in pages:
            if left != _NO_LIMIT and len(rows) >= left:
                yield rows[:left]
                return
            yield rows
            if left != _NO_LIMIT:
                left -= len(rows)
