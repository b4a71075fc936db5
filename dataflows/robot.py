"""The per-robot state machine of the dataflow: ordering, live state, alerts, offline.

Pure functions over msgspec Structs, shaped ``(state, item) -> (state, emits)`` so a
Bytewax ``StatefulLogic`` can wrap them (DESIGN.md, "Dataflow semantics"):

* :func:`on_report` — a report arrived (processing time ``now``),
* :func:`on_tick` — processing time advanced to ``now`` (offline, closing windows),
* :func:`on_restore` — the state came back from a snapshot,
* :func:`next_wakeup` — when :func:`on_tick` should run next,
* :func:`flush` — close every open window (end of stream, tests),
* :func:`snapshot` — an independent copy for ``StatefulLogic.snapshot``.

``RobotState`` is updated in place and returned: copying it (and its open windows) for
every report would cost more than the rest of the step. It holds only Structs, tuples,
lists and dicts, so Bytewax's pickled snapshots round-trip it.

Order is ``(boot, seq)``, never a clock. A report is applied only if strictly newer
than the newest applied one; windows count by event time regardless (see
``dataflows.windows``). Offline is processing time: it is detected by whichever call
first sees ``now`` at or past the deadline, so a silence yields exactly one offline
alert however often (or rarely) ticks run.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from dataflows.rules import Rules
from dataflows.windows import Windows
from fleetpulse.schema import Alert, AlertKind, LiveState, RobotReport, WindowStats

__all__ = [
    "Emits",
    "RobotState",
    "flush",
    "next_wakeup",
    "on_report",
    "on_restore",
    "on_tick",
    "snapshot",
]


class Emits(msgspec.Struct, kw_only=True):
    """What one step produced, for the sink and metrics (counters are for this step)."""

    states: list[LiveState] = msgspec.field(default_factory=list)  # live-state changes
    alerts: list[Alert] = msgspec.field(default_factory=list)
    windows: list[WindowStats] = msgspec.field(default_factory=list)  # closed, oldest first
    late: list[RobotReport] = msgspec.field(default_factory=list)  # too late for their window
    applied: int = 0
    stale: int = 0
    duplicate: int = 0

    @property
    def late_count(self) -> int:
        """Reports too late for their window in this step (``late`` holds them)."""
        return len(self.late)


class RobotState(msgspec.Struct, kw_only=True, gc=False):
    """Everything the dataflow keeps for one robot (one Bytewax key)."""

    live: LiveState  # newest applied report, last_seen, online, status_since
    battery_low: bool = False  # low_battery raised and not yet cleared
    # Processing time at which the robot goes offline; None while it is offline.
    offline_at: float | None = None
    windows: Windows = msgspec.field(default_factory=Windows)
    # Totals over the state's life (Emits carries the per-step numbers).
    applied: int = 0
    stale: int = 0
    duplicate: int = 0
    late: int = 0

    @property
    def robot_id(self) -> str:
        """The robot this state belongs to."""
        return self.live.report.robot_id


def on_report(
    state: RobotState | None, report: RobotReport, now: float, rules: Rules
) -> tuple[RobotState, Emits]:
    """Take one report of one robot at processing time ``now``.

    Applies it to the live state if its ``(boot, seq)`` is newer (else counts it stale
    or duplicate), raises alerts, counts it in its event-time window or routes it to
    ``Emits.late``, and returns windows the advanced watermark closed.
    """
    emits = Emits()
    if state is None:
        state = RobotState(live=_first_live(report, now))
        _applied(state, None, report, now, rules, emits)
    else:
        # The silence may have ended without a tick seeing the deadline pass.
        _check_offline(state, now, emits)
        newest = state.live.report
        if report.order > newest.order:
            _applied(state, newest, report, now, rules, emits)
        elif report.order == newest.order:
            state.duplicate += 1
            emits.duplicate += 1
        else:
            state.stale += 1
            emits.stale += 1
    # Windows are about event time, so even a stale report counts if it is not late.
    if not state.windows.add(report, now, rules):
        state.late += 1
        emits.late.append(report)
    emits.windows.extend(state.windows.close_due(state.robot_id, now, rules))
    return state, emits


def on_tick(state: RobotState, now: float, rules: Rules) -> tuple[RobotState, Emits]:
    """Processing time reached ``now``: mark the robot offline, close passed windows."""
    emits = Emits()
    _check_offline(state, now, emits)
    emits.windows.extend(state.windows.close_due(state.robot_id, now, rules))
    return state, emits


def on_restore(state: RobotState, now: float, rules: Rules) -> RobotState:
    """Resume ``state`` from a snapshot at processing time ``now``.

    An online robot gets a fresh grace period (``now + offline_after_s``): the downtime
    was ours, not the robot's, and must not turn into an offline alert for the whole
    fleet. The window watermark resumes where it was for the same reason.
    """
    if state.live.online:
        state.offline_at = now + rules.offline_after_s
    state.windows.rebase(now, rules)
    return state


def next_wakeup(state: RobotState) -> float | None:
    """Processing time at which :func:`on_tick` has work to do, or None if never."""
    times = [t for t in (state.offline_at, state.windows.close_at) if t is not None]
    return min(times) if times else None


def flush(state: RobotState, rules: Rules) -> tuple[RobotState, Emits]:
    """Close every open window now, whatever the watermark (end of stream, tests)."""
    return state, Emits(windows=state.windows.flush(state.robot_id, rules))


def snapshot(state: RobotState) -> RobotState:
    """A copy of ``state`` that later steps cannot change (Bytewax pickles it later).

    Cheaper than ``copy.deepcopy``: reports and live states are frozen and points are
    tuples, so only the containers the steps mutate are copied.
    """
    w = state.windows
    windows = msgspec.structs.replace(w, open={s: list(p) for s, p in w.open.items()})
    return msgspec.structs.replace(state, windows=windows)


def _first_live(report: RobotReport, now: float) -> LiveState:
    return LiveState(report=report, last_seen=now, online=True, status_since=report.ts)


def _alert(report: RobotReport, kind: AlertKind, at: datetime, detail: str = "") -> Alert:
    # The id names the report that raised it, so a replay after recovery rewrites the
    # same alert instead of adding a second one.
    return Alert(
        id=f"{report.robot_id}:{kind}:{report.boot}:{report.seq}",
        robot_id=report.robot_id,
        kind=kind,
        boot=report.boot,
        seq=report.seq,
        at=at,
        detail=detail,
    )


def _applied(
    state: RobotState,
    prev: RobotReport | None,
    report: RobotReport,
    now: float,
    rules: Rules,
    emits: Emits,
) -> None:
    """Make ``report`` (newer than ``prev``, the previous newest) the live report."""
    live = state.live
    if prev is not None and not live.online:
        emits.alerts.append(_alert(report, "back_online", report.ts))
    new_status = prev is None or prev.status != report.status
    # Errors compare as sets: a robot listing the same faults in another order has
    # nothing new to tell. One alert per report even if both conditions hold (one id).
    entered_error = report.status == "error" and new_status
    new_errors = bool(report.errors) and (prev is None or set(report.errors) != set(prev.errors))
    if entered_error or new_errors:
        emits.alerts.append(_alert(report, "error", report.ts, ", ".join(report.errors)))
    if report.status == "estop" and new_status:
        emits.alerts.append(_alert(report, "estop", report.ts))
    if not state.battery_low and report.battery <= rules.low_battery_pct:
        state.battery_low = True
        emits.alerts.append(_alert(report, "low_battery", report.ts, f"{report.battery:g}%"))
    elif state.battery_low and report.battery >= rules.battery_ok_pct:
        state.battery_low = False
        emits.alerts.append(_alert(report, "battery_ok", report.ts, f"{report.battery:g}%"))
    state.live = LiveState(
        report=report,
        last_seen=now,
        online=True,
        status_since=report.ts if new_status else live.status_since,
    )
    state.offline_at = now + rules.offline_after_s
    state.applied += 1
    emits.applied += 1
    emits.states.append(state.live)


def _check_offline(state: RobotState, now: float, emits: Emits) -> None:
    """Mark the robot offline once if ``now`` is at or past its deadline."""
    deadline = state.offline_at
    if deadline is None or now < deadline:
        return
    # offline_at is None from here until the next applied report: exactly one alert.
    state.offline_at = None
    state.live = msgspec.structs.replace(state.live, online=False)
    emits.states.append(state.live)
    # `at` is the deadline, the processing time the robot became offline: the same
    # whether a tick saw it on time or a late tick or report found it afterwards.
    at = datetime.fromtimestamp(deadline, UTC)
    emits.alerts.append(_alert(state.live.report, "offline", at))
