"""The sink's side of the store: idempotent batch writes of states, windows and alerts.

What makes a replayed batch change nothing (the rules live in :mod:`state.scripts`):

- live state is applied only if its version ``(resets, boot, seq, updated)`` is
  greater than the stored one (:func:`version`): a newer report, or at an equal
  order a later change (offline, back online, a stuck robot's stale count). The
  dataflow derives every version from the Kafka log, so a replay computes the same
  ones and changes nothing. Only reports newer than the stored order are pushed to
  the history, so replays add no duplicates; counters and indexes move only when a
  state is applied, in the same transaction.
- windows are stored by their start (and part): rewriting one is a no-op or an
  overwrite.
- alerts are stored by ``alert.id`` per robot; a known id is a duplicate and is not
  appended to the alert or change streams again.

States are written in two steps: one pipelined read of every robot's stored version
and index buckets, then, per chunk of ``max_per_call`` robots, one MULTI/EXEC with
the writes of the states that are newer — plain commands, the summary counters of
the chunk summed into one small script. Deciding in Python instead of in a Lua
script per state costs Redis about a third of the time (measured: 43 µs of Redis
time per state in Lua, most of it the interpreter, not the commands). It is safe
because each robot has one writer (the dataflow worker that owns its shard), and a
crash between the read and the write, or during it, leaves nothing or the whole
chunk applied (MULTI/EXEC): a replay then reads what is stored and writes the rest.

Windows and alerts are rarer; each chunk of them is one EVALSHA of a script that
makes the same decisions inside Redis. Scripts are loaded once (SCRIPT LOAD) and
called by SHA; after a Redis restart or a Sentinel failover the server may have
forgotten them, so on NOSCRIPT they are loaded again and the whole batch is sent
again — safe, because every write is idempotent.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import hiredis
import msgspec
import redis
from redis.exceptions import NoScriptError

from fleetpulse.alert_rules import Incident
from fleetpulse.schema import Alert, LiveState, RobotReport, WindowStats, encode
from fleetpulse.settings import Settings
from state import scripts
from state.keys import (
    ALERTS_PER_ROBOT,
    RETIRED_TTL_S,
    WINDOWS_PER_ROBOT,
    Keys,
    epoch_us,
    from_epoch_us,
    window_name,
)

# A change-stream entry of a state is the StateChanged JSON; made by wrapping the
# state's JSON instead of encoding it a second time (a unit test holds them equal).
STATE_CHANGE = b'{"type":"state","state":'

# What the state write reads of a robot's hash before deciding (state.keys).
_STORED = ("gen", "boot", "seq", "t", "online", "status", "site", "low", "bucket", "gone")


class _Stored(msgspec.Struct, frozen=True, kw_only=True):
    """What a robot's hash holds that a state write compares and moves indexes by."""

    version: tuple[int, int, int, int] = (0, -1, -1, -1)
    online: str | None = None
    status: str | None = None  # None: the robot was never stored
    site: str | None = None
    low: str | None = None
    bucket: str | None = None
    gone: int | None = None  # retired at this arrival time (ms), and not back since

    @classmethod
    def parse(cls, row: Sequence[bytes | None]) -> _Stored:
        gen, boot, seq, t, online, status, site, low, bucket, gone = (
            None if v is None else v.decode() for v in row
        )
        if boot is None:
            return cls(gone=None if gone is None else int(gone))
        # A robot stored before versions had gen and t reads as gen 0, t -1.
        version = (int(gen or 0), int(boot), int(seq or -1), int(t or -1))
        return cls(version=version, online=online, status=status, site=site, low=low, bucket=bucket)


__all__ = [
    "STATE_CHANGE",
    "HistoryEntry",
    "RedisStateWriter",
    "StateWriter",
    "WriteResult",
    "coalesce",
    "version",
]

# A report applied to live state, with the ordering generation (LiveState.resets) it
# was applied in.
HistoryEntry = tuple[int, RobotReport]


def version(state: LiveState) -> tuple[int, int, int, int]:
    """The order of a robot's state changes: ``(resets, boot, seq, updated ms)``.

    Right after an operator's reset (``reset_pending``) the order is ``(-1, -1)``, so the
    next report of that generation applies and enters the history whatever its order.
    """
    report = state.report
    boot, seq = (-1, -1) if state.reset_pending else (report.boot, report.seq)
    return (state.resets, boot, seq, round(state.updated * 1000))


def coalesce(
    states: Iterable[LiveState],
) -> tuple[list[LiveState], dict[str, list[HistoryEntry]]]:
    """Each robot's newest state, and the reports applied on the way (its history).

    ``states`` holds each robot's changes in the order they happened (robots may
    interleave). A backlog then costs one state write per robot, and no applied report
    is missing from the history.
    """
    newest: dict[str, LiveState] = {}
    history: dict[str, list[HistoryEntry]] = {}
    for st in states:
        robot = st.report.robot_id
        newest[robot] = st
        if st.reset_pending:
            continue  # the reset itself applied no report
        entries = history.setdefault(robot, [])
        if not entries or (entries[-1][0], entries[-1][1].order) != (st.resets, st.report.order):
            entries.append((st.resets, st.report))
    return list(newest.values()), history


class WriteResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one :meth:`StateWriter.write` changed; a replayed batch is all ignored."""

    states_applied: int = 0
    states_ignored: int = 0  # not newer, and not an online -> offline mark
    windows_applied: int = 0
    windows_ignored: int = 0  # identical to the stored window (or older than all kept)
    alerts_added: int = 0
    alerts_duplicate: int = 0  # already stored under the same id
    retired: int = 0  # robots removed (a retirement of a robot not stored is not counted)
    incidents_applied: int = 0
    incidents_ignored: int = 0  # a version not further along than the stored one

    @property
    def applied(self) -> int:
        """Everything that changed the store."""
        return (
            self.states_applied + self.windows_applied + self.alerts_added + self.incidents_applied
        )

    @property
    def ignored(self) -> int:
        """Everything that was already there."""
        return (
            self.states_ignored
            + self.windows_ignored
            + self.alerts_duplicate
            + self.incidents_ignored
        )


class StateWriter(Protocol):
    """Where the dataflow's sink puts its results. Writes must be idempotent."""

    def write(
        self,
        states: Sequence[LiveState],
        windows: Sequence[WindowStats],
        alerts: Sequence[Alert],
        history: Mapping[str, Sequence[HistoryEntry]] | None = None,
        retired: Sequence[tuple[str, int]] = (),
        incidents: Sequence[Incident] = (),
    ) -> WriteResult:
        """Apply one batch; replaying the same batch must change nothing."""
        ...


class _Script:
    """A Lua script known by its SHA1, loaded on demand."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def load(self, client: redis.Redis) -> None:
        sha = client.script_load(self.source)
        if sha != self.sha:  # would mean the server hashes differently: never call by SHA
            raise RuntimeError(f"Redis returned SHA {sha!r} for a script hashed {self.sha}")


_WINDOWS = _Script(scripts.WINDOWS)
_ALERTS = _Script(scripts.ALERTS)
_INCIDENTS = _Script(scripts.INCIDENTS)

_Call = tuple[_Script, list[Any]]  # script, [numkeys, *keys, *argv]


class RedisStateWriter:
    """:class:`StateWriter` on Redis: conditional upserts in Lua, one round trip a batch."""

    def __init__(self, client: redis.Redis, settings: Settings, *, max_per_call: int = 500) -> None:
        """Load the scripts into ``client``'s server (the master) once.

        ``max_per_call`` bounds the items one script call carries, so a huge batch
        does not block Redis for long; all calls still go in one pipeline.
        """
        if max_per_call < 1:
            raise ValueError(f"max_per_call must be >= 1, got {max_per_call}")
        self._client = client
        self._keys = Keys(settings.redis_prefix)
        self._history_len = settings.history_len
        self._changes_len = settings.changes_len
        self._alerts_len = settings.alerts_len
        self._low_battery = settings.low_battery_pct
        self._chunk = max_per_call
        self._load_scripts()

    def _load_scripts(self) -> None:
        for script in (_WINDOWS, _ALERTS, _INCIDENTS):
            script.load(self._client)

    def write(
        self,
        states: Sequence[LiveState],
        windows: Sequence[WindowStats],
        alerts: Sequence[Alert],
        history: Mapping[str, Sequence[HistoryEntry]] | None = None,
        retired: Sequence[tuple[str, int]] = (),
        incidents: Sequence[Incident] = (),
    ) -> WriteResult:
        """Apply a batch: retirements, newer states, new or changed windows, alerts not
        seen before, incident versions further along than the stored ones.

        ``retired`` holds ``(robot id, arrival ms)`` of robots the dataflow forgot; they
        go first (the batch's states, windows and alerts are what came after them: the
        sink leaves out the robot's earlier ones). States go next, so a state change
        precedes the alerts it raised in the change stream. ``history`` may give, per
        robot, every report applied since the last write (oldest first, ending with the
        state's own report), so a caller can coalesce a robot's many states in one batch
        into its newest one without losing history; by default a state's history is its
        own report.
        """
        retired_applied = self._retire(retired) if retired else 0
        states_applied = 0
        if states:
            states_applied = self._write_states(states, history or {})
        calls: list[tuple[str, _Call]] = []
        for i in range(0, len(windows), self._chunk):
            calls.append(("windows", self._windows_call(windows[i : i + self._chunk])))
        for i in range(0, len(alerts), self._chunk):
            calls.append(("alerts", self._alerts_call(alerts[i : i + self._chunk])))
        for i in range(0, len(incidents), self._chunk):
            calls.append(("incidents", self._incidents_call(incidents[i : i + self._chunk])))
        totals = {"windows": [0, 0], "alerts": [0, 0], "incidents": [0, 0]}
        if calls:
            try:
                replies = self._send([call for _, call in calls])
            except NoScriptError:
                self._load_scripts()
                replies = self._send([call for _, call in calls])
            for (kind, _), (applied, ignored) in zip(calls, replies, strict=True):
                totals[kind][0] += int(applied)
                totals[kind][1] += int(ignored)
        return WriteResult(
            states_applied=states_applied,
            states_ignored=len(states) - states_applied,
            windows_applied=totals["windows"][0],
            windows_ignored=totals["windows"][1],
            alerts_added=totals["alerts"][0],
            alerts_duplicate=totals["alerts"][1],
            retired=retired_applied,
            incidents_applied=totals["incidents"][0],
            incidents_ignored=totals["incidents"][1],
        )

    def _retire(self, retired: Sequence[tuple[str, int]]) -> int:
        """Remove each robot's keys, index entries and summary counts, leaving a tombstone
        (its robot hash holding only ``gone`` = the arrival ms, for RETIRED_TTL_S): a
        replayed write from before it is ignored, one from after it (a report that
        arrived later) starts the robot's next life. Returns how many were stored."""
        k = self._keys
        robots = [rid for rid, _ in retired]
        rows = self._round_trip(
            [("HMGET", k.robot(rid), *_STORED) for rid in robots]
            + [("ZRANGE", k.robot_incident_index(rid), 0, -1) for rid in robots]
        )
        known = {rid: _Stored.parse(row) for rid, row in zip(robots, rows, strict=False)}
        incident_ids = dict(zip(robots, rows[len(robots) :], strict=True))
        cmds: list[tuple[Any, ...]] = []
        counters: dict[str, int] = {}
        removed = 0
        for rid, at_ms in retired:
            old = known[rid]
            if old.gone is not None and old.gone >= at_ms:
                continue  # retired already (a replay)
            rkey = k.robot(rid)
            if old.status is not None:
                removed += 1
                self._unindex(cmds, rid, old, counters)
                event = msgspec.json.encode(
                    {"type": "retired", "robot_id": rid, "at": from_epoch_us(at_ms * 1000)}
                )
                cmds.append(
                    ("XADD", k.changes, "MAXLEN", "~", self._changes_len, "*", "data", event)
                )
            cmds.append((
                "DEL", rkey, k.history(rid), k.windows(rid), k.window_index(rid),
                k.robot_alerts(rid), k.robot_alert_index(rid), k.robot_incidents(rid),
                k.robot_incident_ranks(rid), k.robot_incident_index(rid),
            ))  # fmt: skip
            if incident_ids[rid]:
                cmds.append(("ZREM", k.open_incidents, *incident_ids[rid]))
            cmds.append(("HSET", rkey, "gone", at_ms))
            cmds.append(("EXPIRE", rkey, RETIRED_TTL_S))
            known[rid] = _Stored(gone=at_ms)
        flat = [x for pair in counters.items() if pair[1] for x in pair]
        if flat:
            cmds.append(("EVAL", scripts.BUMP, 1, k.summary, *flat))
        if cmds:
            self._transact(cmds)
        return removed

    def _unindex(
        self, cmds: list[tuple[Any, ...]], rid: str, old: _Stored, counters: dict[str, int]
    ) -> None:
        """Take a stored robot out of every index and summary count it is in."""
        k = self._keys

        def bump(field: str) -> None:
            counters[field] = counters.get(field, 0) - 1

        cmds.append(("ZREM", k.all, rid))
        cmds.append(("ZREM", k.battery, rid))
        bump("total")
        cmds.append(("ZREM", k.status_index(old.status or ""), rid))
        bump(f"status:{old.status}")
        if old.site:
            cmds.append(("ZREM", k.site_index(old.site), rid))
            bump(f"site:{old.site}")
            bump(f"site_status:{old.status}:{old.site}")
        if old.online == "1":
            cmds.append(("ZREM", k.online, rid))
            bump("online")
        elif old.online == "0":
            cmds.append(("ZREM", k.offline, rid))
        if old.low == "1":
            bump("low")

    def _send(self, calls: list[_Call]) -> list[Any]:
        # No MULTI: each script is atomic on its own, and a batch cut short by a crash
        # is completed by the replay, which the scripts make harmless.
        pipe = self._client.pipeline(transaction=False)
        for script, args in calls:
            pipe.evalsha(script.sha, *args)
        return pipe.execute()

    def _write_states(
        self, states: Sequence[LiveState], history: Mapping[str, Sequence[HistoryEntry]]
    ) -> int:
        """Apply the newer of ``states``; returns how many were applied."""
        k = self._keys
        robots = list(dict.fromkeys(st.report.robot_id for st in states))
        rows = self._round_trip([("HMGET", k.robot(rid), *_STORED) for rid in robots])
        known = {rid: _Stored.parse(row) for rid, row in zip(robots, rows, strict=True)}
        applied = 0
        for i in range(0, len(states), self._chunk):
            cmds: list[tuple[Any, ...]] = []
            counters: dict[str, int] = {}
            for state in states[i : i + self._chunk]:
                rid = state.report.robot_id
                now = self._apply(cmds, state, known[rid], history, counters)
                if now is not None:
                    known[rid] = now  # a later state of the robot in this batch compares to it
                    applied += 1
            flat = [x for pair in counters.items() if pair[1] for x in pair]
            if flat:
                cmds.append(("EVAL", scripts.BUMP, 1, k.summary, *flat))
            if cmds:
                self._transact(cmds)
        return applied

    def _round_trip(self, cmds: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``cmds`` at once and read their replies.

        Raw RESP (hiredis packs, our loop reads): redis-py's pipeline spends several
        microseconds of Python per command on bookkeeping, which at thousands of
        commands a second is a large share of the dataflow's one core.
        """
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join([hiredis.pack_command(c) for c in cmds])])  # type: ignore[no-untyped-call]
            return [conn.read_response() for _ in cmds]
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]  # replies may be left unread
            raise
        finally:
            pool.release(conn)

    def _transact(self, cmds: Sequence[tuple[Any, ...]]) -> None:
        """``cmds`` in one MULTI/EXEC, in one round trip (applied whole or not at all)."""
        replies = self._round_trip([("MULTI",), *cmds, ("EXEC",)])
        errors = [r for r in replies[-1] if isinstance(r, Exception)] if replies[-1] else []
        if replies[-1] is None or errors:
            raise redis.ResponseError(f"the state write failed: {errors or 'EXEC aborted'}")

    def _apply(
        self,
        cmds: list[tuple[Any, ...]],
        state: LiveState,
        old: _Stored,
        history: Mapping[str, Sequence[HistoryEntry]],
        counters: dict[str, int],
    ) -> _Stored | None:
        """Append the writes of ``state`` to ``cmds`` if it is newer than ``old``; what is
        stored then, or None if it is not newer."""
        r = state.report
        rid = r.robot_id
        v = version(state)
        if v <= old.version:
            return None
        if old.gone is not None and round(state.updated * 1000) <= old.gone:
            return None  # from before the robot was retired (a replay)
        k = self._keys
        bucket = math.floor(r.battery)
        now = _Stored(
            version=v,
            online="1" if state.online else "0",
            status=r.status,
            site=r.site or "",
            low="1" if r.battery <= self._low_battery else "0",
            bucket=str(bucket),
        )
        state_json = encode(state)
        rkey = k.robot(rid)
        if old.gone is not None:  # back after its retirement: a new robot
            cmds.append(("DEL", rkey))
        gen, boot, seq, t = v
        cmds.append((
            "HSET", rkey, "gen", gen, "boot", boot, "seq", seq, "t", t,
            "online", now.online, "status", r.status, "site", now.site,
            "battery", repr(r.battery), "low", now.low, "bucket", now.bucket,
            "state", state_json,
        ))  # fmt: skip

        def bump(field: str, by: int) -> None:
            counters[field] = counters.get(field, 0) + by

        if old.status is None:  # a robot never stored before
            cmds.append(("ZADD", k.all, 0, rid))
            bump("total", 1)
        if old.status != now.status:
            if old.status is not None:
                cmds.append(("ZREM", k.status_index(old.status), rid))
                bump(f"status:{old.status}", -1)
            cmds.append(("ZADD", k.status_index(r.status), 0, rid))
            bump(f"status:{r.status}", 1)
        if old.site != now.site:
            if old.site:
                cmds.append(("ZREM", k.site_index(old.site), rid))
                bump(f"site:{old.site}", -1)
            if now.site:
                cmds.append(("ZADD", k.site_index(now.site), 0, rid))
                bump(f"site:{now.site}", 1)
        if old.status != now.status or old.site != now.site:
            if old.site:
                bump(f"site_status:{old.status}:{old.site}", -1)
            if now.site:
                bump(f"site_status:{now.status}:{now.site}", 1)
        if old.online != now.online:
            if old.online == "1":
                cmds.append(("ZREM", k.online, rid))
                bump("online", -1)
            elif old.online == "0":
                cmds.append(("ZREM", k.offline, rid))
            if now.online == "1":
                cmds.append(("ZADD", k.online, 0, rid))
                bump("online", 1)
            else:
                cmds.append(("ZADD", k.offline, 0, rid))
        if old.low != now.low:
            if old.low == "1":
                bump("low", -1)
            if now.low == "1":
                bump("low", 1)
        # The battery index is scored by whole percent (ZADD only when that moves); the
        # reader checks the exact level from the hash.
        if old.bucket != now.bucket:
            cmds.append(("ZADD", k.battery, bucket, rid))
        order = old.version[:3]
        own: Sequence[HistoryEntry] = () if state.reset_pending else ((gen, r),)
        entries = history.get(rid, own)[-self._history_len :]
        newer = [encode(h) for g, h in entries if (g, h.boot, h.seq) > order]
        if newer:
            hkey = k.history(rid)
            cmds.append(("LPUSH", hkey, *newer))
            cmds.append(("LTRIM", hkey, 0, self._history_len - 1))
        cmds.append(
            ("XADD", k.changes, "MAXLEN", "~", self._changes_len, "*",
             "data", STATE_CHANGE + state_json + b"}")
        )  # fmt: skip
        return now

    def _windows_call(self, windows: Sequence[WindowStats]) -> _Call:
        k = self._keys
        keys: list[str] = []
        argv: list[str | bytes | int] = [WINDOWS_PER_ROBOT, len(windows)]
        for w in windows:
            keys += (k.windows(w.robot_id), k.window_index(w.robot_id), k.robot(w.robot_id))
            start = epoch_us(w.window_start)
            argv += (window_name(start, w.part), start, encode(w))
        return _WINDOWS, [len(keys), *keys, *argv]

    def _incidents_call(self, incidents: Sequence[Incident]) -> _Call:
        k = self._keys
        keys: list[str] = [k.incidents, k.changes, k.open_incidents]  # zset, stream, zset
        argv: list[str | bytes | int] = [
            self._alerts_len,
            self._changes_len,
            ALERTS_PER_ROBOT,
            len(incidents),
        ]
        for i in incidents:
            rid = i.robot_id
            keys += (
                k.robot_incidents(rid),
                k.robot_incident_ranks(rid),
                k.robot_incident_index(rid),
                k.robot(rid),
            )
            argv += (i.id, epoch_us(i.opened_at), i.rank, encode(i))
        return _INCIDENTS, [len(keys), *keys, *argv]

    def _alerts_call(self, alerts: Sequence[Alert]) -> _Call:
        k = self._keys
        keys: list[str] = [k.alerts, k.changes]
        argv: list[str | bytes | int] = [
            self._alerts_len,
            self._changes_len,
            ALERTS_PER_ROBOT,
            len(alerts),
        ]
        for a in alerts:
            keys += (
                k.robot_alerts(a.robot_id),
                k.robot_alert_index(a.robot_id),
                k.alerts_of_kind(a.kind),
                k.robot(a.robot_id),
            )
            argv += (a.id, epoch_us(a.at), encode(a))
        return _ALERTS, [len(keys), *keys, *argv]
