"""The reads both state readers share, written once as *plans*.

A plan is a generator that yields the Redis command of each round trip in turn, gets
its reply back (parsed by redis-py as the command's named method would parse it) and
returns the answer. :class:`~state.reader.RedisStateReader` runs plans on a blocking
client, :class:`~state.async_reader.AsyncRedisStateReader` awaits them on an asyncio
one; neither holds any read logic of its own, so the contract suite holds both to the
same answers. A plan checks its arguments before its first command (InvalidQuery).

Live state is stored as the LiveState JSON the writer encoded (``P:robot:{r}`` field
``state``); :meth:`Reads.get_raw` and :meth:`Reads.listing` hand those bytes on as they
are, for the API to send without decoding and encoding them again.

A listing without ``battery_lt`` is :data:`PAGE_SCRIPT`: one round trip per page,
which picks the smallest index of the filters, reads the next ids from it and their
hash fields, and returns the states that match, all inside Redis (a page whose
filters reject most candidates may take a few such calls, each bounded, :data:`MAX_SCAN`
ids in all). Listings with ``battery_lt`` are the blocking reader's alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Generator, Iterable
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from fleetpulse.alert_rules import Incident, IncidentState, Severity
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
from state.keys import Keys, epoch_us

__all__ = [
    "MAX_PAGE",
    "MAX_SCAN",
    "PAGE_SCRIPT",
    "Command",
    "FleetSummary",
    "Plan",
    "Reads",
    "check_listing",
    "filter_indexes",
]

MAX_PAGE = 1000  # most robots / entries one call returns
MAX_SCAN = 5000  # most index entries one list_robots or alerts call examines

_STATUS_BY_NAME: dict[str, Status] = {s: s for s in STATUSES}

_T = TypeVar("_T")


class FleetSummary(msgspec.Struct, frozen=True, kw_only=True):
    """Counts over the whole fleet, kept by the writer (no robot is walked to answer)."""

    total: int
    online: int
    offline: int
    low_battery: int  # battery <= low_battery_pct when last written
    by_status: dict[Status, int]  # every status, zeros included
    by_site: dict[str, int]  # sites with at least one robot
    by_site_status: dict[str, dict[Status, int]]  # site -> status -> count (non-zero only)


state_decoder = msgspec.json.Decoder(LiveState)
_report_dec = msgspec.json.Decoder(RobotReport)
_window_dec = msgspec.json.Decoder(WindowStats)
_alert_dec = msgspec.json.Decoder(Alert)
_incident_dec = msgspec.json.Decoder(Incident)


def robot_of(incident_id: str) -> str:
    """The robot of an incident id ``<robot>:<rule>:<boot>:<seq>`` (a robot id may hold
    colons; a rule name cannot)."""
    return incident_id.rsplit(":", 3)[0]


def check_limit(limit: int, name: str = "limit") -> None:
    """Raise InvalidQuery unless 1 <= ``limit`` <= MAX_PAGE."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidQuery(name, f"must be between 1 and {MAX_PAGE}, got {limit}")


def check_since(since: datetime | None) -> None:
    """Raise InvalidQuery for a ``since`` without a UTC offset."""
    # A naive time's instant would depend on the server's zone; refuse it by name.
    if since is not None and since.utcoffset() is None:
        raise InvalidQuery(
            "since",
            f"{since.isoformat()} has no UTC offset; give one, e.g. 2025-06-01T12:00:00Z",
        )


def filter_indexes(
    keys: Keys, status: Status | None, site: str | None, online: bool | None
) -> list[str]:
    """The index of each filter given (status, site, online), in that order."""
    return [
        key
        for key, given in (
            (keys.status_index(status or ""), status is not None),
            (keys.site_index(site or ""), site is not None),
            (keys.online_index(bool(online)), online is not None),
        )
        if given
    ]


def check_listing(limit: int, cursor: str | None, battery_lt: float | None) -> None:
    """Raise InvalidQuery for a bad ``limit``, ``cursor`` or ``battery_lt`` of a listing."""
    check_limit(limit)
    if cursor is not None and not is_robot_id(cursor):
        raise InvalidQuery("cursor", f"{cursor!r} is not a robot id from a previous page")
    if battery_lt is not None and not math.isfinite(battery_lt):
        raise InvalidQuery("battery_lt", f"must be a finite number, got {battery_lt!r}")


def text(value: bytes | str) -> str:
    """A reply as text (replies are bytes: clients are made without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else value


def texts(values: Iterable[Any]) -> list[str]:
    """Replies as text; redis-py types them as bytes | str (| tuples with scores)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# --- one page of a listing, in Redis --------------------------------------------------------
# KEYS: the indexes of the filters given (status, site, online; the index of every robot
# when none is). ARGV: 1, 2 the robot hash key around the id (Keys.robot), 3 where to
# start ("-", or "(" and the cursor), 4 most ids to examine, 5 matches that end the page,
# 6 status, 7 site, 8 online ("1"/"0"), each "" when not filtered on.
# Drives the page by the smallest index (the first of equal ones) and re-checks every
# candidate against its hash (the truth: an index entry may be a moment behind it).
# Returns {ids read, ids examined, last id examined (nil if none), state JSON...}; an
# empty index ends the listing. Reads only, so it runs as EVALSHA_RO (on a replica too).
# The robot keys are built inside from ARGV, like the writer's: single node or Sentinel.
PAGE_SCRIPT = """
local drive, size = nil, nil
for i = 1, #KEYS do
  local n = redis.call('ZCARD', KEYS[i])
  if n == 0 then return {0, 0, false} end
  if size == nil or n < size then drive, size = KEYS[i], n end
end
local ids = redis.call('ZRANGEBYLEX', drive, ARGV[3], '+', 'LIMIT', 0, tonumber(ARGV[4]))
local want = tonumber(ARGV[5])
local head, tail, status, site, online = ARGV[1], ARGV[2], ARGV[6], ARGV[7], ARGV[8]
local out = {#ids, 0, false}
for i = 1, #ids do
  local row = redis.call('HMGET', head .. ids[i] .. tail, 'status', 'site', 'online', 'state')
  out[2], out[3] = i, ids[i]
  if row[4] and (status == '' or row[1] == status) and (site == '' or row[2] == site)
      and (online == '' or row[3] == online) then
    out[#out + 1] = row[4]
    if #out - 3 == want then break end
  end
end
return out
"""
PAGE_SHA = hashlib.sha1(PAGE_SCRIPT.encode(), usedforsecurity=False).hexdigest()

# One Redis command: its name and arguments. A plan yields the command of each round
# trip in turn, receives its reply (parsed by redis-py as its named method would) and
# returns the answer.
Command = tuple[str | int | float, ...]
Plan = Generator[Command, Any, _T]


class Reads:
    """Every read both readers share, as plans over one key prefix."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        # The robot hash key around the id, for the page script (Keys names every key).
        self.robot_head, _, self.robot_tail = keys.robot("\0").partition("\0")

    def get_raw(self, robot_id: str) -> Plan[bytes | None]:
        raw = yield ("HGET", self.keys.robot(robot_id), "state")
        state: bytes | None = raw
        return state

    def listing(
        self, status: Status | None, site: str | None, online: bool | None, cursor: str | None,
        limit: int,
    ) -> Plan[tuple[list[bytes], str | None]]:  # fmt: skip
        """Robots matching the lex filters after ``cursor`` (no battery_lt), as JSON."""
        k = self.keys
        filters = filter_indexes(k, status, site, online)
        # With at most one filter the driving index answers it fully; otherwise read
        # more ids per round trip, as some will be filtered out.
        chunk = limit if len(filters) <= 1 else max(limit, 500)
        wanted = (status or "", site or "", "" if online is None else "1" if online else "0")
        indexes = filters or [k.all]
        out: list[bytes] = []
        pos = cursor
        scanned = 0
        while scanned < MAX_SCAN:
            n = min(chunk, MAX_SCAN - scanned)
            start = "-" if pos is None else "(" + pos
            reply = yield (
                "EVALSHA_RO", PAGE_SHA, len(indexes), *indexes, self.robot_head,
                self.robot_tail, start, n, limit - len(out), *wanted,
            )  # fmt: skip
            fetched, examined, last, *states = reply
            if examined:
                scanned += examined
                pos = text(last)
            out += states
            if len(out) == limit:
                at_end = fetched < n and examined == fetched
                return out, None if at_end else pos
            if fetched < n:
                return out, None
        return out, pos

    def history(self, robot_id: str, limit: int, since: datetime | None) -> Plan[list[RobotReport]]:
        check_limit(limit)
        check_since(since)
        key = self.keys.history(robot_id)
        if since is None:
            raw = yield ("LRANGE", key, 0, limit - 1)
            return [_report_dec.decode(v) for v in raw]
        out: list[RobotReport] = []
        start, step = 0, max(limit, 100)
        while True:
            raw = yield ("LRANGE", key, start, start + step - 1)
            for value in raw:
                report = _report_dec.decode(value)
                if report.ts >= since:
                    out.append(report)
                    if len(out) == limit:
                        return out
            if len(raw) < step:
                return out
            start += step

    def stats(self, robot_id: str, limit: int, since: datetime | None) -> Plan[list[WindowStats]]:
        check_limit(limit)
        check_since(since)
        low = "-inf" if since is None else epoch_us(since)
        index = self.keys.window_index(robot_id)
        starts = yield ("ZREVRANGEBYSCORE", index, "+inf", low, "LIMIT", 0, limit)
        if not starts:
            return []
        raw = yield ("HMGET", self.keys.windows(robot_id), *texts(starts))
        return [_window_dec.decode(v) for v in raw if v is not None]

    def summary(self) -> Plan[FleetSummary]:
        counters = yield ("HGETALL", self.keys.summary)
        raw = {text(f): int(v) for f, v in counters.items()}
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
        self, robot_id: str | None, kind: AlertKind | None, since: datetime | None, limit: int
    ) -> Plan[list[Alert]]:
        check_limit(limit)
        check_since(since)
        low = None if since is None else epoch_us(since)
        if robot_id is not None:
            return (yield from self._robot_alerts(robot_id, kind, low, limit))
        k = self.keys
        stream = k.alerts if kind is None else k.alerts_of_kind(kind)
        out: list[Alert] = []
        top, scanned = "+", 0
        while scanned < MAX_SCAN:
            n = min(max(limit, 100), MAX_SCAN - scanned)
            entries = yield ("XREVRANGE", stream, top, "-", "COUNT", n)
            entries = entries or []
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
            top = "(" + texts([entries[-1][0]])[0]
        return out

    def incidents(
        self,
        robot_id: str | None,
        rule: str | None,
        state: IncidentState | None,
        severity: Severity | None,
        since: datetime | None,
        limit: int,
    ) -> Plan[list[Incident]]:
        """Incidents (their newest version), newest opened first, matching every filter;
        ``since`` keeps those opened at or after it."""
        check_limit(limit)
        check_since(since)
        low = None if since is None else epoch_us(since)

        def wanted(i: Incident) -> bool:
            return (
                (rule is None or i.rule == rule)
                and (state is None or i.state == state)
                and (severity is None or i.severity == severity)
            )

        k = self.keys
        out: list[Incident] = []
        low_score = "-inf" if low is None else low
        # A sorted set by opened_at: the robot's (capped at ALERTS_PER_ROBOT), the fleet's
        # open ones, or the fleet's newest alerts_len (read at most MAX_SCAN deep).
        if robot_id is not None:
            index = k.robot_incident_index(robot_id)
        else:
            index = k.open_incidents if state == "open" else k.incidents
        offset, n = 0, max(limit, 100)
        while offset < MAX_SCAN:
            found = yield ("ZREVRANGEBYSCORE", index, "+inf", low_score, "LIMIT", offset, n)
            ids = texts(found)
            if not ids:
                return out
            if robot_id is not None:
                raws = yield ("HMGET", k.robot_incidents(robot_id), *ids)
            else:  # one robot hash per incident (each in its robot's slot)
                raws = []
                for incident_id in ids:
                    key = k.robot_incidents(robot_of(incident_id))
                    raws.append((yield ("HGET", key, incident_id)))
            for raw in raws:
                if raw is None:
                    continue  # trimmed or retired between the reads
                incident = _incident_dec.decode(raw)
                if wanted(incident):
                    out.append(incident)
                    if len(out) == limit:
                        return out
            if len(ids) < n:
                return out
            offset += n
        return out

    def _robot_alerts(
        self, robot_id: str, kind: AlertKind | None, low: int | None, limit: int
    ) -> Plan[list[Alert]]:
        k = self.keys
        out: list[Alert] = []
        offset, n = 0, limit if kind is None else max(limit, 100)
        # The per-robot set is capped (ALERTS_PER_ROBOT), which bounds this loop.
        while True:
            index = k.robot_alert_index(robot_id)
            low_score = "-inf" if low is None else low
            found = yield ("ZREVRANGEBYSCORE", index, "+inf", low_score, "LIMIT", offset, n)
            ids = texts(found)
            if not ids:
                return out
            raws = yield ("HMGET", k.robot_alerts(robot_id), *ids)
            for raw in raws:
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
