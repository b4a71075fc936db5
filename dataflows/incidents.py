"""Incidents from alert rules: per robot and rule, a condition held for ``for_s`` opens
one, its clear condition closes it (the rules themselves: ``fleetpulse.alert_rules``).

Pure functions over small Structs, in the shape of ``dataflows.robot``. Reports reach
:func:`on_sample` in **event-time order** (``ts``, then ``(boot, seq)``), each
``(boot, seq)`` once: :class:`Reorder` holds a robot's reports until its watermark
(the one its windows close by) has passed them, so the incidents depend on the
reports only, never on the order or the number of times Kafka delivered them. A
report behind the watermark when it arrives is late for rules as it is for windows.

``for_s`` is event time: the condition must hold on every report from the first one
where it held (``since``) to one at least ``for_s`` later, which opens the incident.
While open, a report on which the clear condition holds closes it (default: the one
where ``when`` no longer holds); the next run starts from scratch. An incident's id
names its robot, rule and the report that opened it, so a replay opens the same one.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import msgspec

from fleetpulse.alert_rules import Clauses, Incident, Rule, RuleBook
from fleetpulse.schema import RobotReport

__all__ = [
    "Compiled",
    "Incident",
    "Reorder",
    "Sample",
    "Scoped",
    "Settled",
    "Track",
    "acknowledge",
    "compiled",
    "evaluate",
    "on_sample",
    "rule_removed",
    "silence_due",
    "silence_step",
]


class Track(msgspec.Struct, frozen=True, gc=False):
    """What one rule knows of one robot: the current run's start and the open incident."""

    since: datetime | None = None  # event time the condition started holding (None: not)
    open: Incident | None = None


def on_sample(
    track: Track | None, rule: Rule, report: RobotReport, distance: float | None = None
) -> tuple[Track, Incident | None]:
    """Take the robot's next report in event-time order under ``rule``: the new track,
    and the incident it opened or closed (None when nothing changed). ``distance``: the
    robot's last closed window's distance before the report (``distance_m`` clauses)."""
    track = track or Track()
    holds = rule.opens(report, distance)
    clears = track.open is not None and rule.clears(report, distance)
    return _step(track, rule, report.robot_id, report.ts, report.order, holds, clears)


def _step(
    track: Track,
    rule: Rule,
    robot_id: str,
    ts: datetime,
    order: tuple[int, int],
    holds: bool,
    clears: bool,
) -> tuple[Track, Incident | None]:
    """:func:`on_sample` of the report at ``ts`` and ``order``, with the rule's conditions
    already judged: ``holds`` (its ``when``) and ``clears`` (its clear condition; read
    only while an incident is open)."""
    if track.open is not None:
        if not clears:
            return track, None
        closed = msgspec.structs.replace(
            track.open, state="closed", closed_at=ts, closed_by=order, reason="cleared"
        )
        return _NONE, closed
    if not holds:
        return (_NONE, None) if track.since is not None else (track, None)
    since = track.since if track.since is not None else ts
    if (ts - since).total_seconds() < rule.for_s:
        return (track if track.since is not None else Track(since=since)), None
    boot, seq = order
    incident = Incident(
        id=f"{robot_id}:{rule.name}:{boot}:{seq}",
        robot_id=robot_id,
        rule=rule.name,
        severity=rule.severity,
        since=since,
        opened_at=ts,
        opened_by=order,
    )
    return Track(since=since, open=incident), incident


_NONE = Track()


def acknowledge(
    tracks: dict[str, Track], incident_id: str, at: datetime, by: str
) -> Incident | None:
    """Mark the open incident ``incident_id`` acknowledged (in ``tracks``); its new
    version, or None when it is not open (closed, unknown, or acknowledged already)."""
    for name, track in tracks.items():
        incident = track.open
        if incident is not None and incident.id == incident_id:
            if incident.acknowledged_at is not None:
                return None
            acked = msgspec.structs.replace(incident, acknowledged_at=at, acknowledged_by=by)
            tracks[name] = Track(since=track.since, open=acked)
            return acked
    return None


def silence_step(
    tracks: dict[str, Track],
    rules: Sequence[Rule],
    last: RobotReport,
    last_seen: float,
    now: float,
    arrived: RobotReport | None,
) -> list[Incident]:
    """The silence rules at arrival time ``now``: one whose robot sent nothing since
    ``last_seen`` for its ``silence_s`` + ``for_s`` opens (id from ``last``, the newest
    report before the silence); a report arriving (``arrived``) closes it."""
    out: list[Incident] = []
    for rule in rules:
        limit = rule.silence_s
        if limit is None:
            continue
        track = tracks.get(rule.name)
        if track is not None and track.open is not None:
            if arrived is not None:
                closed = msgspec.structs.replace(
                    track.open,
                    state="closed",
                    closed_at=arrived.ts,
                    closed_by=arrived.order,
                    reason="cleared",
                )
                del tracks[rule.name]
                out.append(closed)
            continue
        if arrived is None and now - last_seen >= limit + rule.for_s:
            boot, seq = last.order
            incident = Incident(
                id=f"{last.robot_id}:{rule.name}:{boot}:{seq}",
                robot_id=last.robot_id,
                rule=rule.name,
                severity=rule.severity,
                since=_utc(last_seen + limit),
                opened_at=_utc(last_seen + limit + rule.for_s),
                opened_by=last.order,
            )
            tracks[rule.name] = Track(since=incident.since, open=incident)
            out.append(incident)
    return out


def silence_due(tracks: dict[str, Track], rules: Sequence[Rule], last_seen: float) -> float | None:
    """Arrival time at which the next silence rule without an open incident opens one."""
    due = [
        last_seen + rule.silence_s + rule.for_s
        for rule in rules
        if rule.silence_s is not None
        and (rule.name not in tracks or tracks[rule.name].open is None)
    ]
    return min(due) if due else None


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


def rule_removed(track: Track, at: datetime) -> Incident | None:
    """The open incident of a rule that is no longer in the rules, closed (or None)."""
    if track.open is None:
        return None
    return msgspec.structs.replace(track.open, state="closed", closed_at=at, reason="rule removed")


class Sample(NamedTuple):
    """What the rules read of a held report, compact: a tuple of plain values, which the
    garbage collector stops tracking, and a short array in snapshots."""

    ts_us: int  # event time, µs since the epoch
    boot: int
    seq: int
    battery: float
    speed: float
    status: str
    errors: tuple[str, ...]
    x: float
    y: float

    @classmethod
    def of(cls, report: RobotReport, ts_us: int) -> Sample:
        pose = report.pose
        return cls(
            ts_us,
            report.boot,
            report.seq,
            report.battery,
            report.speed,
            report.status,
            tuple(report.errors),
            pose.x,
            pose.y,
        )

    @property
    def ts(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.ts_us)


class Reorder(msgspec.Struct, gc=False):
    """A robot's reports not yet evaluated, as samples in event-time order, each
    ``(boot, seq)`` once.

    Samples are sorted by ``(ts µs, boot, seq)`` across ``pending`` and then ``tail``
    (every key in ``tail`` is after every key in ``pending``); :meth:`release` hands out
    those at or before the watermark. New samples go to the short ``tail``, which joins
    ``pending`` when it is full, so holding a report copies a few dozen items, not the
    whole buffer (a robot reporting 50 times a second holds hundreds). The tuples are
    replaced, never changed, so a copy of the buffer shares them. ``done`` is the newest
    key released: anything at or before it arriving later is late (or a duplicate) and
    is not evaluated.
    """

    pending: tuple[Sample, ...] = ()
    tail: tuple[Sample, ...] = ()
    done: tuple[int, int, int] = (-(2**62), -1, -1)

    TAIL = 64

    def add(self, report: RobotReport, ts_us: int) -> bool:
        """Hold ``report`` for evaluation; False if it is late or held already."""
        key = (ts_us, report.boot, report.seq)
        if key <= self.done:
            return False
        tail, pending = self.tail, self.pending
        if tail and tail[-1][:3] < key:  # in order: the usual case
            new = (*tail, Sample.of(report, ts_us))
        elif (tail and tail[0][:3] <= key) or not pending or pending[-1][:3] < key:
            new = _insert(tail, key, report)
            if new is tail:
                return False  # held already
        else:  # before the tail: into the long part (rare)
            new_pending = _insert(pending, key, report)
            self.pending = new_pending
            return new_pending is not pending
        if len(new) > self.TAIL:
            self.pending, self.tail = pending + new, ()
        else:
            self.tail = new
        return True

    def release(self, watermark_us: float) -> tuple[Sample, ...]:
        """The held samples at or before the watermark, oldest first."""
        pending, tail = self.pending, self.tail
        first = pending[0] if pending else tail[0] if tail else None
        if first is None or first[0] > watermark_us:
            return ()
        n = bisect.bisect_right(pending, watermark_us, key=_ts)
        if n < len(pending):
            out, self.pending = pending[:n], pending[n:]
        else:
            k = bisect.bisect_right(tail, watermark_us, key=_ts)
            out, self.pending, self.tail = pending + tail[:k], (), tail[k:]
        self.done = out[-1][:3]
        return out

    def next_due_us(self) -> int | None:
        """Event time (µs) of the oldest held report: when the watermark releases it."""
        return self.pending[0][0] if self.pending else self.tail[0][0] if self.tail else None


def _ts(sample: Sample) -> int:
    return sample[0]


def _insert(
    samples: tuple[Sample, ...], key: tuple[int, int, int], report: RobotReport
) -> tuple[Sample, ...]:
    """``samples`` with the report of ``key`` in its place; ``samples`` itself if held."""
    i = bisect.bisect_left(samples, key, key=lambda p: p[:3])
    if i < len(samples) and samples[i][:3] == key:
        return samples
    return (*samples[:i], Sample.of(report, key[0]), *samples[i:])


Settled = tuple[int, int]  # (Scoped.key, mask): the clause bits a robot's rules rest at


def evaluate(
    tracks: dict[str, Track],
    scoped: Scoped,
    robot_id: str,
    samples: Sequence[Sample],
    now: float,
    distance_of: Callable[[int], float | None] | None = None,
    settled: Settled | None = None,
) -> tuple[list[Incident], Settled | None]:
    """Run the robot's ``samples`` (event-time order) through its rules in ``scoped``,
    updating ``tracks`` in place (a track only while its condition holds or its incident
    is open). A track of a rule not in ``scoped`` (removed, or the robot left its scope)
    closes its incident at ``now`` (the arrival clock, unix s). Silence rules are left to
    :func:`silence_step`.

    Also returns where the rules *rest*: the mask of clause bits after which another
    report with the same bits changes nothing (no condition holding without an
    incident open, no open incident whose clear condition holds), or None. A report
    whose bits equal ``settled`` (the last call's answer) is passed over at once: most
    reports of a robot repeat the bits of the one before.
    """
    out: list[Incident] = []
    if tracks:
        for name in [n for n in tracks if n not in scoped.names]:
            closed = rule_removed(tracks.pop(name), _utc(now))
            if closed is not None:
                out.append(closed)
    need_distance = scoped.distance and distance_of is not None
    clauses = scoped.clauses
    key = scoped.key
    for sample in samples:
        ts_us, boot, seq, battery, speed, status, errors, x, y = sample
        distance = distance_of(ts_us) if need_distance else None  # type: ignore[misc]
        m = clauses.mask_of(battery, speed, status, errors, x, y, distance)
        if settled is not None and settled[1] == m and settled[0] == key:
            continue
        calm = True  # whether the rules rest at m after this report
        for rule, when, clear in scoped.reports:
            holds = m & when == when
            track = tracks.get(rule.name)
            clears = False
            if track is None:
                if not holds:
                    continue  # the usual case: nothing held, nothing holds
                track = _NONE
            elif track.open is not None:
                clears = (m & clear == clear) if clear is not None else not holds
                if not clears:
                    continue  # open, and stays so
            track, changed = _step(track, rule, robot_id, sample.ts, (boot, seq), holds, clears)
            if track.open is not None:  # opened now: does its clear condition hold too?
                if clear is not None and m & clear == clear:
                    calm = False
                tracks[rule.name] = track
            elif track.since is not None:
                calm = False  # held, not yet for long enough
                tracks[rule.name] = track
            else:
                if holds:
                    calm = False  # closed, and its condition holds: a new run starts next
                tracks.pop(rule.name, None)
            if changed is not None:
                out.append(changed)
        settled = (key, m) if calm and key is not None else None
    return out, settled


class Scoped(NamedTuple):
    """The rules of one robot at one site, ready to run."""

    rules: tuple[Rule, ...]  # every rule in scope, silences too
    # The rules on reports, with the bits their `when` and clear conditions need in the
    # mask of `clauses` (clear None: the incident closes when `when` stops holding).
    reports: tuple[tuple[Rule, int, int | None], ...]
    names: frozenset[str]
    distance: bool  # some rule reads the last window's distance
    clauses: Clauses
    # Names these rules across processes (a digest of them), for evaluate's `settled`;
    # None when their clauses do not fit the 63 bits a snapshot keeps of a mask.
    key: int | None


class Compiled:
    """A rule book ready for the hot path: each robot's rules in scope, cached."""

    MAX_CACHED = 1 << 20

    def __init__(self, book: RuleBook) -> None:
        self.book = book
        self.silences = any(rule.silence_s is not None for rule in book.rules)
        # Scopes indexed, so a robot seen for the first time costs a few lookups and its
        # id matched against the patterns only: rules for all, by site, by id, by pattern
        # (each as positions in the book, to keep its order).
        self._everyone: list[int] = []
        self._by_site: dict[str, list[int]] = {}
        self._by_robot: dict[str, list[int]] = {}
        self._patterns: list[tuple[int, re.Pattern[str]]] = []
        for i, rule in enumerate(book.rules):
            scope = rule.scope
            if scope.sites is None and scope.robots is None and scope.pattern is None:
                self._everyone.append(i)
            for site in scope.sites or ():
                self._by_site.setdefault(site, []).append(i)
            for robot in scope.robots or ():
                self._by_robot.setdefault(robot, []).append(i)
            if scope.pattern is not None:
                self._patterns.append((i, re.compile(scope.pattern)))
        self._scoped: dict[tuple[str, str | None], Scoped] = {}
        self._sets: dict[tuple[int, ...], Scoped] = {}  # robots with the same rules share one

    def scoped(self, robot_id: str, site: str | None) -> Scoped:
        """The rules whose scope holds ``robot_id`` at ``site``, in the book's order."""
        key = (robot_id, site)
        got = self._scoped.get(key)
        if got is None:
            if len(self._scoped) >= self.MAX_CACHED:
                self._scoped.clear()
            got = self._scoped[key] = self._scope_of(robot_id, site)
        return got

    def _scope_of(self, robot_id: str, site: str | None) -> Scoped:
        found = set(self._everyone)
        if site is not None:
            found.update(self._by_site.get(site, ()))
        found.update(self._by_robot.get(robot_id, ()))
        found.update(i for i, pattern in self._patterns if pattern.fullmatch(robot_id))
        positions = tuple(sorted(found))
        got = self._sets.get(positions)
        if got is None:
            rules = tuple(self.book.rules[i] for i in positions)
            on_reports = [r for r in rules if r.silence_s is None]
            conditions = [c for r in on_reports for c in (r.when, r.clear) if c is not None]
            clauses = Clauses(conditions)
            compiled = tuple(
                (r, clauses.need(r.when), None if r.clear is None else clauses.need(r.clear))
                for r in on_reports
            )
            distance = any(c.distance_m is not None for c in conditions)
            names = frozenset(r.name for r in rules)
            key = None
            if clauses.size <= 63:
                digest = hashlib.blake2b(msgspec.msgpack.encode(rules), digest_size=8).digest()
                key = int.from_bytes(digest) >> 1
            got = self._sets[positions] = Scoped(rules, compiled, names, distance, clauses, key)
        return got


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_lock = threading.Lock()
_current: Compiled = Compiled(RuleBook())


def compiled(book: RuleBook) -> Compiled:
    """``book`` compiled, once per book (every shard of a process shares it)."""
    global _current
    current = _current
    if current.book is book:
        return current
    with _lock:
        if _current.book is not book:
            _current = Compiled(book)
        return _current
