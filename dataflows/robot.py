"""The per-robot state machine of the dataflow: ordering, live state, alerts, offline.

Pure functions over msgspec Structs, shaped ``(state, item) -> (state, emits)`` so the
shard step (``dataflows.shard``) can wrap them (DESIGN.md, "Dataflow semantics"):

* :func:`on_report` — a report arrived (at Kafka append time ``arrival``),
* :func:`on_progress` — the arrival clock of the robot's partition reached ``progress``
  (every report appended until then has been read): offline, closing windows,
* :func:`on_control` — an operator reset the robot's ordering.

Alert rules (``fleetpulse.alert_rules``, in ``Rules.book``) run on the same steps: a
report in a rule's scope waits in ``held`` until the robot's watermark passes it, and
reports are evaluated in event-time order (``dataflows.incidents``), each once.

Each returns a *new* state and leaves the one it was given untouched (a shallow copy
is taken first; reports, live states and window lists are never changed in place),
so the caller keeps the old state when a step raises: one robot's bad step never
corrupts its state.

Order is ``(boot, seq)``, never a clock. A report is applied only if strictly newer
than the newest applied one (or right after an operator's reset); windows count by
event time regardless (see ``dataflows.windows``).

Time is the *arrival* clock (Kafka append time), never the flow's own: a robot is
offline when no report of it arrived for ``offline_after_s``, judged by how far the
source has read. A flow that stalls, lags or restarts therefore raises no offline
alert for robots whose reports wait in Kafka, and a replay decides exactly what the
first run decided. Every report that arrives, even a stale or duplicate one, shows
the robot is alive.

Every live-state change carries ``updated`` (arrival clock, strictly increasing per
robot) so that Redis can order changes at an equal ``(boot, seq)`` (offline, back
online, stale counts) and ignore replays. Alert ids name what raised them (the
report's order, or the arrival time), so a replay rewrites the same alert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from dataflows.incidents import (
    Reorder,
    Sample,
    Scoped,
    Track,
    compiled,
    evaluate,
    silence_due,
    silence_step,
)
from dataflows.records import Control
from dataflows.rules import Rules
from dataflows.windows import Windows
from fleetpulse.alert_rules import Incident
from fleetpulse.schema import Alert, AlertKind, LiveState, RobotReport, WindowStats

__all__ = [
    "HOLD_GRACE_S",
    "Emits",
    "RobotState",
    "offline_at",
    "on_control",
    "on_progress",
    "on_report",
    "rules_due",
]

# A robot that keeps reporting has its held reports released by its next report (its
# watermark moves on); the timer is for one that went quiet, so it waits this much past
# the watermark. Waking every robot as each held report came due doubled its steps.
HOLD_GRACE_S = 1.0


class Emits(msgspec.Struct, kw_only=True):
    """What one step produced, for the sink and metrics (counters are for this step)."""

    states: list[LiveState] = msgspec.field(default_factory=list)  # live-state changes
    alerts: list[Alert] = msgspec.field(default_factory=list)
    windows: list[WindowStats] = msgspec.field(default_factory=list)  # closed, oldest first
    late: list[RobotReport] = msgspec.field(default_factory=list)  # too late for their window
    incidents: list[Incident] = msgspec.field(default_factory=list)  # opened or closed
    applied: int = 0
    stale: int = 0
    duplicate: int = 0


class RobotState(msgspec.Struct, kw_only=True, gc=False):
    """Everything the dataflow keeps for one robot.

    Persisted: shard snapshots hold it as msgpack (``dataflows.shard.ShardState``); a
    new field needs a default, and a removed or retyped field needs a new shard
    format number (old snapshots are then dropped and the log is replayed).
    """

    live: LiveState  # newest applied report, last_seen, online, stale run, resets
    partition: int = 0  # Kafka partition of the newest report: its progress times this robot
    battery_low: bool = False  # low_battery raised and not yet cleared
    stuck: bool = False  # the stuck alert of the current stale run was raised
    windows: Windows = msgspec.field(default_factory=Windows)
    # Alert rules: each rule's track (only while its condition holds or its incident is
    # open), and the reports in some rule's scope waiting for the watermark.
    tracks: dict[str, Track] = msgspec.field(default_factory=dict)
    held: Reorder | None = None
    recent: list[tuple[int, float]] = msgspec.field(default_factory=list)  # (end µs, distance)
    settled: tuple[int, int] | None = None  # where the rules rest (incidents.evaluate)
    # Totals over the state's life (Emits carries the per-step numbers).
    applied: int = 0
    stale: int = 0
    duplicate: int = 0
    late: int = 0

    @property
    def robot_id(self) -> str:
        """The robot this state belongs to."""
        return self.live.report.robot_id


def offline_at(state: RobotState, rules: Rules) -> float | None:
    """Arrival time at which the robot is offline if nothing arrives, None while offline."""
    live = state.live
    return live.last_seen + rules.offline_after_s if live.online else None


def on_report(
    state: RobotState | None, report: RobotReport, arrival: float, partition: int, rules: Rules
) -> tuple[RobotState, Emits]:
    """Take one report of one robot that Kafka appended at ``arrival`` (unix seconds).

    Applies it to the live state if its ``(boot, seq)`` is newer (else counts it stale
    or duplicate, and notes the robot is alive), raises alerts, counts it in its
    event-time window or routes it to ``Emits.late``, and returns windows it closed.
    """
    emits = Emits()
    if state is None:
        live = LiveState(
            report=report, last_seen=arrival, online=True, status_since=report.ts, updated=arrival
        )
        st = RobotState(live=live, partition=partition)
        _applied(st, None, report, arrival, rules, emits)
    else:
        st = _copy(state)
        st.partition = partition
        # The silence may have ended before the source's progress showed it.
        _check_offline(st, arrival, rules, emits)
        newest = st.live.report
        if st.live.reset_pending or report.order > newest.order:
            _applied(st, newest, report, arrival, rules, emits)
        else:
            _alive(st, report, arrival, rules, emits)
    w = st.windows
    robot = st.robot_id
    # Windows are about event time, so even a stale report counts if it is not late.
    rebased = False
    if not w.add(report, arrival, rules):
        if w.clock_went_back(arrival, rules):
            emits.windows += w.rebase(robot, report, arrival, rules)
            w.add(report, arrival, rules)
            rebased = True
        else:
            st.late += 1
            emits.late.append(report)
    emits.windows += w.close_due(robot, arrival, rules)
    if rules.book.rules or st.tracks:
        before = state.live if state is not None else None
        _rules(st, report, arrival, rebased, rules, emits, before)
    return st, emits


def _rules(
    st: RobotState,
    report: RobotReport | None,
    arrival: float,
    rebased: bool,
    rules: Rules,
    emits: Emits,
    before: LiveState | None = None,
) -> None:
    """Hold ``report`` for the robot's rules, then evaluate what the watermark passed;
    silence rules at ``arrival`` (a report's, or a progress mark's: ``report`` None)."""
    if emits.windows:  # the last closed windows, for distance_m clauses
        ended = [(_us(w.window_end), w.distance_m) for w in emits.windows]
        st.recent = sorted([*st.recent, *ended])[-3:]
    book = compiled(rules.book)
    scoped = book.scoped(st.robot_id, st.live.report.site)
    if book.silences and scoped.rules:
        if report is not None and before is not None:
            # A silence may have run out before a progress mark showed it, as offline.
            emits.incidents += silence_step(
                st.tracks, scoped.rules, before.report, before.last_seen, arrival, None
            )
        last, seen = st.live.report, st.live.last_seen
        emits.incidents += silence_step(st.tracks, scoped.rules, last, seen, arrival, report)

    distance_of = _distance_of(st.recent) if scoped.distance else None
    held = st.held
    if rebased and held is not None:
        # The robot's clock went back: what waits goes first, then time starts again.
        _evaluate(st, scoped, held.release(math.inf), arrival, distance_of, emits)
        held = st.held = Reorder()
    if report is not None and scoped.reports:
        if held is None:
            held = st.held = Reorder()
        held.add(report, _us(report.ts))
    if held is not None and (held.pending or held.tail):
        released = held.release((st.windows.offset + arrival) * 1e6)
        if released or st.tracks:
            _evaluate(st, scoped, released, arrival, distance_of, emits)
    elif st.tracks and not st.tracks.keys() <= scoped.names:  # a rule it is tracked by is gone
        _evaluate(st, scoped, (), arrival, None, emits)


def _evaluate(
    st: RobotState,
    scoped: Scoped,
    samples: Sequence[Sample],
    arrival: float,
    distance_of: Callable[[int], float | None] | None,
    emits: Emits,
) -> None:
    found, st.settled = evaluate(
        st.tracks, scoped, st.robot_id, samples, arrival, distance_of, st.settled
    )
    emits.incidents += found


def _distance_of(recent: list[tuple[int, float]]) -> Callable[[int], float | None]:
    """The distance of the newest of ``recent`` windows that ended at or before a report
    (by its event time in µs)."""

    def distance_of(ts: int) -> float | None:
        before = [d for end, d in recent if end <= ts]
        return before[-1] if before else None

    return distance_of


def rules_due(state: RobotState, rules: Rules) -> float | None:
    """Arrival time at which the robot's rules need a look: the watermark passes its
    oldest held report, or a silence rule runs out (None: neither)."""
    held = state.held
    oldest = held.next_due_us() if held is not None else None
    due = None if oldest is None else oldest / 1e6 - state.windows.offset + HOLD_GRACE_S
    # No rules (the usual flow), or none on silence: nothing but what is held.
    if not rules.book.rules or not (book := compiled(rules.book)).silences:
        return due
    scoped = book.scoped(state.robot_id, state.live.report.site)
    silence = silence_due(state.tracks, scoped.rules, state.live.last_seen)
    if silence is None or (due is not None and due <= silence):
        return due
    return silence


def on_progress(state: RobotState, progress: float, rules: Rules) -> tuple[RobotState, Emits]:
    """The robot's partition was read up to arrival time ``progress``: offline, windows."""
    emits = Emits()
    st = _copy(state)
    _check_offline(st, progress, rules, emits)
    emits.windows += st.windows.close_due(st.robot_id, progress, rules)
    if rules.book.rules or st.tracks:
        _rules(st, None, progress, False, rules, emits)
    return st, emits


def on_control(state: RobotState, control: Control, rules: Rules) -> tuple[RobotState, Emits]:
    """An operator reset the robot's ordering: its next report applies whatever its order.

    For a robot stuck behind a ``(boot, seq)`` it will never reach again (reflashed,
    boot counter lost). ``resets`` grows by one and orders ahead of any earlier
    ``(boot, seq)`` in Redis, so the store follows too.
    """
    emits = Emits()
    st = _copy(state)
    live = st.live
    arrival = control.arrival_ms / 1000
    resets = live.resets + 1
    st.live = msgspec.structs.replace(
        live, resets=resets, stale=0, reset_pending=True, updated=_next(live, arrival)
    )
    st.stuck = False
    emits.states.append(st.live)
    emits.alerts.append(
        Alert(
            id=f"{st.robot_id}:order_reset:{resets}",
            robot_id=st.robot_id,
            kind="order_reset",
            boot=live.report.boot,
            seq=live.report.seq,
            at=_utc(arrival),
            detail=f"by {control.by}: the next report is applied whatever its (boot, seq)",
        )
    )
    return st, emits


def _copy(state: RobotState) -> RobotState:
    # Everything else in the state is immutable or replaced, never changed in place.
    held = state.held
    return msgspec.structs.replace(
        state,
        windows=state.windows.copy(),
        tracks=dict(state.tracks),
        held=None if held is None else Reorder(held.pending, held.tail, held.done),  # copy on write
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def _us(ts: datetime) -> int:
    """Microseconds since the epoch, exact."""
    return (ts - _EPOCH) // _ONE_US


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


def _next(live: LiveState, at: float) -> float:
    """``updated`` of the next change: its time, but strictly after the previous change."""
    return max(at, live.updated + 0.001)


def _alert(
    live: LiveState, report: RobotReport, kind: AlertKind, at: datetime, detail: str = ""
) -> Alert:
    # The id names the report that raised it (and the ordering generation), so a replay
    # after recovery rewrites the same alert instead of adding a second one.
    return Alert(
        id=f"{report.robot_id}:{kind}:{live.resets}:{report.boot}:{report.seq}",
        robot_id=report.robot_id,
        kind=kind,
        boot=report.boot,
        seq=report.seq,
        at=at,
        detail=detail,
    )


def _back_online(live: LiveState, report: RobotReport, arrival: float) -> Alert:
    ms = round(arrival * 1000)
    return Alert(
        id=f"{report.robot_id}:back_online:{ms}",
        robot_id=report.robot_id,
        kind="back_online",
        boot=report.boot,
        seq=report.seq,
        at=_utc(arrival),
    )


def _applied(
    st: RobotState,
    prev: RobotReport | None,
    report: RobotReport,
    arrival: float,
    rules: Rules,
    emits: Emits,
) -> None:
    """Make ``report`` (newer than ``prev``, the previous newest) the live report."""
    live = st.live
    if prev is not None and not live.online:
        emits.alerts.append(_back_online(live, report, arrival))
    new_status = prev is None or prev.status != report.status
    # Errors compare as sets: a robot listing the same faults in another order has
    # nothing new to tell. One alert per report even if both conditions hold (one id).
    entered_error = report.status == "error" and new_status
    new_errors = bool(report.errors) and (prev is None or set(report.errors) != set(prev.errors))
    if entered_error or new_errors:
        emits.alerts.append(_alert(live, report, "error", report.ts, ", ".join(report.errors)))
    if report.status == "estop" and new_status:
        emits.alerts.append(_alert(live, report, "estop", report.ts))
    if not st.battery_low and report.battery <= rules.low_battery_pct:
        st.battery_low = True
        emits.alerts.append(_alert(live, report, "low_battery", report.ts, f"{report.battery:g}%"))
    elif st.battery_low and report.battery >= rules.battery_ok_pct:
        st.battery_low = False
        emits.alerts.append(_alert(live, report, "battery_ok", report.ts, f"{report.battery:g}%"))
    st.live = LiveState(
        report=report,
        last_seen=arrival,
        online=True,
        status_since=report.ts if new_status else live.status_since,
        resets=live.resets,
        updated=arrival if prev is None else _next(live, arrival),
    )
    st.stuck = False
    st.applied += 1
    emits.applied += 1
    emits.states.append(st.live)


def _alive(st: RobotState, report: RobotReport, arrival: float, rules: Rules, emits: Emits) -> None:
    """A stale or duplicate report: not applied, but the robot is sending."""
    live = st.live
    newest = live.report
    stale = live.stale
    if report.order == newest.order:
        st.duplicate += 1
        emits.duplicate += 1
    else:
        st.stale += 1
        emits.stale += 1
        stale += 1
    came_back = not live.online
    if came_back:
        emits.alerts.append(_back_online(live, report, arrival))
    stuck = stale >= rules.stuck_after
    if stuck and not st.stuck:
        st.stuck = True
        emits.alerts.append(
            Alert(
                id=f"{newest.robot_id}:stuck:{live.resets}:{newest.boot}:{newest.seq}",
                robot_id=newest.robot_id,
                kind="stuck",
                boot=newest.boot,
                seq=newest.seq,
                at=_utc(arrival),
                detail=f"{stale} reports in a row older than boot {newest.boot} seq "
                f"{newest.seq}; POST /v1/robots/{newest.robot_id}/reset-order (admin) "
                "applies the next report whatever its order",
            )
        )
    st.live = msgspec.structs.replace(
        live, last_seen=arrival, online=True, stale=stale, updated=_next(live, arrival)
    )
    # Written when it tells something: the robot came back, or it is stuck and its
    # stale count grew (visible in its live state). Other stale or duplicate reports
    # only move the offline deadline, kept here.
    if came_back or (stuck and stale > live.stale):
        emits.states.append(st.live)


def _check_offline(st: RobotState, now: float, rules: Rules, emits: Emits) -> None:
    """Mark the robot offline once if arrival time ``now`` is at or past its deadline."""
    live = st.live
    if not live.online:
        return
    deadline = live.last_seen + rules.offline_after_s
    if now < deadline:
        return
    # Offline until the next report arrives: exactly one alert per silence. `at` is the
    # deadline on the arrival clock, the same whoever noticed (progress or a report).
    st.live = msgspec.structs.replace(live, online=False, updated=_next(live, deadline))
    emits.states.append(st.live)
    report = live.report
    emits.alerts.append(
        Alert(
            id=f"{report.robot_id}:offline:{round(deadline * 1000)}",
            robot_id=report.robot_id,
            kind="offline",
            boot=report.boot,
            seq=report.seq,
            at=_utc(deadline),
        )
    )
