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
import re
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from fleetpulse.alert_rules import Incident, Predicate, Rule, RuleBook, predicate
from fleetpulse.schema import RobotReport

__all__ = [
    "Compiled",
    "Incident",
    "Reorder",
    "Scoped",
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
    track: Track | None,
    rule: Rule,
    report: RobotReport,
    distance: float | None = None,
    opens: Predicate | None = None,
    clears: Predicate | None = None,
) -> tuple[Track, Incident | None]:
    """Take the robot's next report in event-time order under ``rule``: the new track,
    and the incident it opened or closed (None when nothing changed). ``distance``: the
    robot's last closed window's distance before the report (``distance_m`` clauses);
    ``opens``/``clears``: the rule's conditions compiled (:class:`Compiled`)."""
    track = track or Track()
    if track.open is not None:
        if not (clears(report, distance) if clears else rule.clears(report, distance)):
            return track, None
        closed = msgspec.structs.replace(
            track.open,
            state="closed",
            closed_at=report.ts,
            closed_by=report.order,
            reason="cleared",
        )
        return Track(), closed
    if not (opens(report, distance) if opens else rule.opens(report, distance)):
        return (Track(), None) if track.since is not None else (track, None)
    since = track.since if track.since is not None else report.ts
    if (report.ts - since).total_seconds() < rule.for_s:
        return (track if track.since is not None else Track(since=since)), None
    boot, seq = report.order
    incident = Incident(
        id=f"{report.robot_id}:{rule.name}:{boot}:{seq}",
        robot_id=report.robot_id,
        rule=rule.name,
        severity=rule.severity,
        since=since,
        opened_at=report.ts,
        opened_by=report.order,
    )
    return Track(since=since, open=incident), incident


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


class Reorder(msgspec.Struct, gc=False):
    """A robot's reports not yet evaluated, in event-time order, each ``(boot, seq)`` once.

    ``pending`` is sorted by ``(ts µs, boot, seq)``; :meth:`release` hands out those at
    or before the watermark. ``done`` is the newest key released: anything at or before
    it arriving later is late (or a duplicate) and is not evaluated.
    """

    pending: list[tuple[int, int, int, RobotReport]] = msgspec.field(default_factory=list)
    done: tuple[int, int, int] = (-(2**62), -1, -1)

    def add(self, report: RobotReport, ts_us: int) -> bool:
        """Hold ``report`` for evaluation; False if it is late or held already. The lists
        are replaced, never changed in place, so a copy of the buffer shares them."""
        key = (ts_us, report.boot, report.seq)
        if key <= self.done:
            return False
        pending = self.pending
        if not pending or pending[-1][:3] < key:  # in order: the usual case
            self.pending = [*pending, (*key, report)]
            return True
        i = bisect.bisect_left(pending, key, key=lambda p: p[:3])
        if i < len(pending) and pending[i][:3] == key:
            return False
        self.pending = [*pending[:i], (*key, report), *pending[i:]]
        return True

    def release(self, watermark_us: float) -> list[RobotReport]:
        """The held reports at or before the watermark, oldest first."""
        pending = self.pending
        if not pending or pending[0][0] > watermark_us:
            return []
        n = bisect.bisect_right(pending, watermark_us, key=lambda p: p[0])
        out, self.pending = pending[:n], pending[n:]
        self.done = out[-1][:3]
        return [p[3] for p in out]

    def next_due_us(self) -> int | None:
        """Event time (µs) of the oldest held report: when the watermark releases it."""
        return self.pending[0][0] if self.pending else None


def evaluate(
    tracks: dict[str, Track],
    scoped: Scoped,
    reports: Sequence[RobotReport],
    now: float,
    distance_of: Callable[[RobotReport], float | None] | None = None,
) -> list[Incident]:
    """Run ``reports`` (event-time order) through the robot's rules in ``scoped``,
    updating ``tracks`` in place (a track only while its condition holds or its incident
    is open). A track of a rule not in ``scoped`` (removed, or the robot left its scope)
    closes its incident at ``now`` (the arrival clock, unix s). Silence rules are left to
    :func:`silence_step`."""
    out: list[Incident] = []
    if tracks:
        for name in [n for n in tracks if n not in scoped.names]:
            closed = rule_removed(tracks.pop(name), _utc(now))
            if closed is not None:
                out.append(closed)
    need_distance = scoped.distance and distance_of is not None
    for report in reports:
        distance = distance_of(report) if need_distance else None  # type: ignore[misc]
        for rule, opens, clears in scoped.reports:
            track = tracks.get(rule.name)
            if track is None and not opens(report, distance):
                continue  # the usual case: nothing held, nothing holds
            track, changed = on_sample(track, rule, report, distance, opens, clears)
            if track.since is None and track.open is None:
                tracks.pop(rule.name, None)
            else:
                tracks[rule.name] = track
            if changed is not None:
                out.append(changed)
    return out


class Scoped(NamedTuple):
    """The rules of one robot at one site, ready to run."""

    rules: tuple[Rule, ...]  # every rule in scope, silences too
    reports: tuple[tuple[Rule, Predicate, Predicate], ...]  # rules on reports, compiled
    names: frozenset[str]
    distance: bool  # some rule reads the last window's distance


class Compiled:
    """A rule book ready for the hot path: each robot's rules in scope, cached."""

    MAX_CACHED = 1 << 20

    def __init__(self, book: RuleBook) -> None:
        self.book = book
        self._compiled = {
            rule.name: (
                rule,
                predicate(rule.when),
                predicate(rule.clear) if rule.clear is not None else _not(predicate(rule.when)),
            )
            for rule in book.rules
            if rule.silence_s is None
        }
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
            on_reports = tuple(self._compiled[r.name] for r in rules if r.name in self._compiled)
            distance = any(
                c is not None and c.distance_m is not None
                for r, _, _ in on_reports
                for c in (r.when, r.clear)
            )
            names = frozenset(r.name for r in rules)
            got = self._sets[positions] = Scoped(rules, on_reports, names, distance)
        return got


def _not(p: Predicate) -> Predicate:
    return lambda r, d: not p(r, d)


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
