"""The per-robot state machine: ordering, live state, alerts, offline, windows, restore."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.robot import (
    Emits,
    RobotState,
    flush,
    next_wakeup,
    on_report,
    on_restore,
    on_tick,
    snapshot,
)
from dataflows.rules import Rules
from fleetpulse.errors import ConfigError
from fleetpulse.schema import STATUSES, Pose, RobotReport, Status, WindowStats
from fleetpulse.settings import Settings

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a multiple of 60 s since the epoch
NOW = 10_000.0  # processing time; deliberately unrelated to event time
RULES = Rules(
    offline_after_s=30.0,
    low_battery_pct=20.0,
    battery_ok_pct=25.0,
    window_s=60,
    allowed_lateness_s=10.0,
)


def rep(
    seq: int,
    *,
    boot: int = 0,
    at: float | None = None,
    robot: str = "amr-1",
    status: Status = "idle",
    battery: float = 80.0,
    x: float = 0.0,
    y: float = 0.0,
    speed: float = 0.0,
    errors: Iterable[str] = (),
) -> RobotReport:
    """A report; its event time defaults to ``seq`` seconds after T0."""
    return RobotReport(
        robot_id=robot,
        boot=boot,
        seq=seq,
        ts=T0 + timedelta(seconds=seq if at is None else at),
        status=status,
        battery=battery,
        pose=Pose(x=x, y=y, theta=0.0),
        speed=speed,
        errors=list(errors),
    )


def feed(
    reports: Iterable[RobotReport], now: float = NOW, rules: Rules = RULES
) -> tuple[RobotState, list[Emits]]:
    """Run reports of one robot through on_report at one processing time."""
    state: RobotState | None = None
    out = []
    for r in reports:
        state, emits = on_report(state, r, now, rules)
        out.append(emits)
    assert state is not None
    return state, out


def kinds(emits: Emits) -> list[str]:
    return [a.kind for a in emits.alerts]


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


# --- rules ------------------------------------------------------------------------------


def test_rules_from_settings() -> None:
    s = Settings(
        offline_after_s=12.5,
        low_battery_pct=15.0,
        battery_ok_pct=30.0,
        window_s=120,
        allowed_lateness_s=3.0,
    )
    assert Rules.from_settings(s) == Rules(
        offline_after_s=12.5,
        low_battery_pct=15.0,
        battery_ok_pct=30.0,
        window_s=120,
        allowed_lateness_s=3.0,
    )
    assert Rules.from_settings(Settings()).offline_after_s == 30.0


def test_rules_refuse_a_hysteresis_that_would_flap() -> None:
    with pytest.raises(ConfigError, match="FLEETPULSE_BATTERY_OK_PCT"):
        Rules.from_settings(Settings(low_battery_pct=30.0, battery_ok_pct=30.0))


# --- ordering and live state ------------------------------------------------------------


def test_first_report_creates_online_live_state() -> None:
    r = rep(1, status="moving")
    state, emits = on_report(None, r, NOW, RULES)
    assert state.live.report == r
    assert (state.live.last_seen, state.live.online, state.live.status_since) == (NOW, True, r.ts)
    assert emits.states == [state.live]
    assert (emits.applied, emits.stale, emits.duplicate, emits.late_count) == (1, 0, 0, 0)
    assert state.offline_at == NOW + 30.0
    assert state.robot_id == "amr-1"


def test_stale_and_duplicate_reports_are_counted_and_change_nothing() -> None:
    state, _ = feed([rep(5, battery=70.0)])
    live = state.live
    state, dup = on_report(state, rep(5, battery=10.0), NOW + 1, RULES)
    assert (dup.applied, dup.stale, dup.duplicate) == (0, 0, 1)
    state, stale = on_report(state, rep(4, battery=10.0, status="estop"), NOW + 2, RULES)
    assert (stale.applied, stale.stale, stale.duplicate) == (0, 1, 0)
    assert state.live is live  # not even last_seen moved
    assert dup.states == stale.states == []
    assert dup.alerts == stale.alerts == []
    assert not state.battery_low
    assert (state.applied, state.stale, state.duplicate) == (1, 1, 1)
    assert state.offline_at == NOW + 30.0  # only an applied report resets the deadline


def test_reboot_is_newer_than_any_seq_of_the_previous_boot() -> None:
    state, _ = feed([rep(1000, boot=0, at=50.0)])
    state, emits = on_report(state, rep(0, boot=1, at=1.0), NOW, RULES)
    assert emits.applied == 1
    assert state.live.report.order == (1, 0)
    state, emits = on_report(state, rep(1001, boot=0, at=60.0), NOW, RULES)
    assert emits.stale == 1
    assert state.live.report.order == (1, 0)


def test_clocks_are_not_used_for_order() -> None:
    state, _ = feed([rep(1, at=100.0)])
    state, emits = on_report(state, rep(2, at=5.0), NOW, RULES)  # newer, older clock
    assert emits.applied == 1
    assert state.live.report.seq == 2


def test_status_since_is_the_event_time_the_status_was_entered() -> None:
    state, _ = feed([rep(1, status="idle"), rep(2, status="idle")])
    assert state.live.status_since == T0 + timedelta(seconds=1)
    state, _ = on_report(state, rep(3, status="moving"), NOW, RULES)
    assert state.live.status_since == T0 + timedelta(seconds=3)
    state, _ = on_report(state, rep(7, status="moving"), NOW + 5, RULES)
    assert state.live.status_since == T0 + timedelta(seconds=3)
    assert state.live.last_seen == NOW + 5


# --- alerts -----------------------------------------------------------------------------


def test_low_battery_hysteresis() -> None:
    levels = [50.0, 20.0, 19.0, 22.0, 24.9, 25.0, 22.0, 20.1, 20.0, 100.0]
    state, out = feed([rep(i, battery=b) for i, b in enumerate(levels)])
    fired = [(i, a.kind, a.id) for i, e in enumerate(out) for a in e.alerts]
    assert fired == [
        (1, "low_battery", "amr-1:low_battery:0:1"),
        # 19, 22, 24.9 lie at/below or between the thresholds: still low, nothing new
        (5, "battery_ok", "amr-1:battery_ok:0:5"),
        # 22 and 20.1 are between the thresholds on the way down: not low yet
        (8, "low_battery", "amr-1:low_battery:0:8"),
        (9, "battery_ok", "amr-1:battery_ok:0:9"),
    ]
    assert not state.battery_low


def test_first_report_with_low_battery_alerts() -> None:
    state, [emits] = feed([rep(3, battery=5.0)])
    [alert] = emits.alerts
    assert (alert.kind, alert.id, alert.at, alert.boot, alert.seq) == (
        "low_battery",
        "amr-1:low_battery:0:3",
        T0 + timedelta(seconds=3),
        0,
        3,
    )
    assert state.battery_low


def test_error_alerts_on_entering_error_or_new_error_list() -> None:
    state, out = feed(
        [
            rep(1, status="moving"),
            rep(2, status="error", errors=["E_MOTOR"]),  # enters error (one alert)
            rep(3, status="error", errors=["E_MOTOR"]),  # same: nothing
            rep(4, status="error"),  # still error, list cleared: nothing
            rep(5, status="moving", errors=["E_LIDAR", "E_CAM"]),  # new list
            rep(6, status="moving", errors=["E_CAM", "E_LIDAR"]),  # same set, reordered
            rep(7, status="moving", errors=["E_CAM"]),  # changed
            rep(8, status="moving"),
            rep(9, status="error"),  # enters error again, no list
        ]
    )
    fired = [(a.id, a.detail) for e in out for a in e.alerts]
    assert fired == [
        ("amr-1:error:0:2", "E_MOTOR"),
        ("amr-1:error:0:5", "E_LIDAR, E_CAM"),
        ("amr-1:error:0:7", "E_CAM"),
        ("amr-1:error:0:9", ""),
    ]
    assert state.live.status_since == T0 + timedelta(seconds=9)


def test_estop_alerts_when_the_status_becomes_estop() -> None:
    _, out = feed(
        [
            rep(1, status="estop"),
            rep(2, status="estop"),
            rep(3, status="idle"),
            rep(4, status="estop"),
        ]
    )
    assert [kinds(e) for e in out] == [["estop"], [], [], ["estop"]]
    assert out[3].alerts[0].id == "amr-1:estop:0:4"


# --- offline ----------------------------------------------------------------------------


def test_offline_exactly_once_then_back_online_exactly_once() -> None:
    state, _ = feed([rep(1)])
    state, e = on_tick(state, NOW + 29.9, RULES)
    assert (e.states, e.alerts) == ([], [])
    state, e = on_tick(state, NOW + 30.0, RULES)
    [offline] = e.alerts
    assert (offline.kind, offline.id, offline.at) == ("offline", "amr-1:offline:0:1", utc(NOW + 30))
    [live] = e.states
    assert (live.online, live.report.seq, live.last_seen) == (False, 1, NOW)
    for t in (NOW + 30.0, NOW + 31.0, NOW + 500.0):
        state, e = on_tick(state, t, RULES)
        assert (e.states, e.alerts) == ([], [])
    # A duplicate or stale report is no sign of life.
    state, e = on_report(state, rep(1), NOW + 600, RULES)
    assert (e.alerts, state.live.online) == ([], False)
    state, e = on_report(state, rep(2), NOW + 601, RULES)
    [back] = e.alerts
    assert (back.kind, back.id, back.at) == ("back_online", "amr-1:back_online:0:2", rep(2).ts)
    assert [s.online for s in e.states] == [True]
    state, e = on_report(state, rep(3), NOW + 602, RULES)
    assert e.alerts == []
    # The next silence is a new one: one more offline, named after the last report.
    state, e = on_tick(state, NOW + 632, RULES)
    assert [a.id for a in e.alerts] == ["amr-1:offline:0:3"]


def test_report_after_an_unticked_silence_emits_offline_then_back_online() -> None:
    state, _ = feed([rep(1)])
    state, e = on_report(state, rep(2), NOW + 45.0, RULES)
    assert [(a.kind, a.id) for a in e.alerts] == [
        ("offline", "amr-1:offline:0:1"),
        ("back_online", "amr-1:back_online:0:2"),
    ]
    assert e.alerts[0].at == utc(NOW + 30.0)
    assert [(s.online, s.report.seq) for s in e.states] == [(False, 1), (True, 2)]


def test_next_wakeup_is_the_earliest_deadline() -> None:
    state, _ = feed([rep(1, at=30.0)])
    # offline at NOW+30; window [0, 60) closes at NOW + 30 (to its end) + 10 (lateness)
    assert next_wakeup(state) == pytest.approx(NOW + 30.0)
    state, e = on_tick(state, NOW + 30.0, RULES)
    assert kinds(e) == ["offline"]
    assert next_wakeup(state) == pytest.approx(NOW + 40.0)
    state, e = on_tick(state, NOW + 40.0, RULES)
    assert [w.count for w in e.windows] == [1]
    assert next_wakeup(state) is None  # offline, no open window: nothing to wait for


def test_restore_gives_online_robots_a_fresh_grace_period() -> None:
    state, _ = feed([rep(1)])
    restored = on_restore(pickle.loads(pickle.dumps(state)), NOW + 1000.0, RULES)
    assert restored.offline_at == NOW + 1030.0
    restored, e = on_tick(restored, NOW + 1029.9, RULES)
    assert (e.states, e.alerts) == ([], [])
    restored, e = on_tick(restored, NOW + 1030.0, RULES)
    assert kinds(e) == ["offline"]


def test_restore_leaves_offline_robots_offline_without_a_new_alert() -> None:
    state, _ = feed([rep(1)])
    state, _ = on_tick(state, NOW + 30.0, RULES)
    state = on_restore(state, NOW + 1000.0, RULES)
    assert state.offline_at is None
    state, e = on_tick(state, NOW + 5000.0, RULES)
    assert (e.states, e.alerts) == ([], [])
    state, e = on_report(state, rep(2), NOW + 5001.0, RULES)
    assert kinds(e) == ["back_online"]


def test_restore_does_not_make_replayed_reports_late() -> None:
    state, _ = feed([rep(1, at=30.0)])
    state = on_restore(state, NOW + 3600.0, RULES)  # an hour of downtime
    state, e = on_report(state, rep(2, at=31.0), NOW + 3600.0, RULES)
    assert (e.late, e.windows) == ([], [])
    _, e = flush(state, RULES)
    assert [w.count for w in e.windows] == [2]


# --- windows through the state machine --------------------------------------------------


def test_late_report_is_counted_routed_and_still_applied_if_newer() -> None:
    state, _ = feed([rep(1, at=5.0)])
    state, e = on_report(state, rep(2, at=100.0), NOW, RULES)  # watermark 90
    assert [(w.window_start, w.count) for w in e.windows] == [(T0, 1)]
    late = rep(3, at=10.0, status="charging")
    state, e = on_report(state, late, NOW, RULES)
    assert e.late == [late]
    assert e.late_count == 1
    assert state.late == 1
    assert e.applied == 1
    assert state.live.report == late
    _, e = flush(state, RULES)
    assert [(w.window_start, w.count) for w in e.windows] == [(T0 + timedelta(seconds=60), 1)]


def test_stale_report_still_counts_in_its_window() -> None:
    state, _ = feed([rep(2, at=20.0, x=3, y=4), rep(1, at=10.0)])
    assert state.stale == 1
    _, e = flush(state, RULES)
    [w] = e.windows
    assert (w.count, w.distance_m) == (2, 5.0)


def test_window_boundaries_are_epoch_aligned() -> None:
    state, out = feed([rep(1, at=59.999), rep(2, at=60.0), rep(3, at=119.0)])
    # The report at 119 s moved the watermark to 109 s: [0, 60) closed on the way.
    closed = [w for e in out for w in e.windows] + flush(state, RULES)[1].windows
    assert [(w.window_start, w.window_end, w.count) for w in closed] == [
        (T0, T0 + timedelta(seconds=60), 1),
        (T0 + timedelta(seconds=60), T0 + timedelta(seconds=120), 2),
    ]


def test_distance_in_boot_seq_order_when_reports_arrive_shuffled() -> None:
    path = [(0.0, 0.0), (3.0, 4.0), (3.0, 0.0), (0.0, 0.0)]  # 5 + 4 + 3 = 12 m
    reports = [rep(i, at=float(i), x=x, y=y) for i, (x, y) in enumerate(path)]
    state, _ = feed([reports[2], reports[0], reports[3], reports[1]])
    _, e = flush(state, RULES)
    assert e.windows[0].distance_m == pytest.approx(12.0)


def test_state_pickles_cleanly() -> None:
    state, _ = feed(
        [rep(1, battery=10.0, errors=["E1"], x=1.0), rep(3, at=70.0), rep(2, status="estop")]
    )
    state, _ = on_tick(state, NOW + 31.0, RULES)
    again = pickle.loads(pickle.dumps(state))
    assert again == state
    assert again.live == state.live
    assert again.windows.open == state.windows.open
    assert flush(again, RULES)[1] == flush(state, RULES)[1]


def test_snapshot_is_not_changed_by_later_steps() -> None:
    state, _ = feed([rep(1, at=5.0), rep(2, at=6.0)])
    snap = snapshot(state)
    frozen = pickle.dumps(snap)
    state, _ = on_report(state, rep(3, at=7.0), NOW + 1, RULES)
    state, _ = on_report(state, rep(4, at=200.0, battery=1.0), NOW + 2, RULES)
    state, _ = on_tick(state, NOW + 100, RULES)
    assert pickle.dumps(snap) == frozen
    assert snap.live.report.seq == 2
    assert [len(p) for p in snap.windows.open.values()] == [2]
    assert state.live.report.seq == 4


# --- properties -------------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn, robot: str) -> list[RobotReport]:
    """One robot's reports in (boot, seq) order, with untrusted clocks."""
    out: list[RobotReport] = []
    boot, seq = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.integers(0, 9)) == 0:
            boot, seq = boot + 1, draw(st.integers(0, 2))  # a reboot restarts seq
        else:
            seq += draw(st.integers(1, 4))  # gaps: some reports never arrive
        out.append(
            rep(
                seq,
                boot=boot,
                robot=robot,
                at=draw(st.floats(0.0, 300.0)),  # several minutes, in any order
                status=draw(st.sampled_from(STATUSES)),
                battery=draw(st.floats(0.0, 100.0)),
                x=draw(st.floats(-500.0, 500.0)),
                y=draw(st.floats(-500.0, 500.0)),
                speed=draw(st.floats(0.0, 3.0)),
                errors=draw(st.lists(st.sampled_from(["E1", "E2", "E3"]), max_size=2)),
            )
        )
    return out


PATIENT = msgspec.structs.replace(RULES, allowed_lateness_s=1e6)  # nothing closes early


def run_fleet(
    arrival: list[RobotReport],
) -> tuple[dict[str, RobotState], list[WindowStats], int]:
    states: dict[str, RobotState] = {}
    windows: list[WindowStats] = []
    late = 0
    for r in arrival:
        states[r.robot_id], e = on_report(states.get(r.robot_id), r, NOW, PATIENT)
        windows += e.windows
        late += e.late_count
    for state in states.values():
        windows += flush(state, PATIENT)[1].windows
    # Robots are independent keys; only the order within one robot is meaningful.
    windows.sort(key=lambda w: (w.robot_id, w.window_start))
    return states, windows, late


def status_since_model(arrival: list[RobotReport]) -> datetime:
    """Reference: the status run among the reports applied in this arrival order."""
    newest: RobotReport | None = None
    since = T0
    for r in arrival:
        if newest is None or r.order > newest.order:
            if newest is None or r.status != newest.status:
                since = r.ts
            newest = r
    return since


@settings(max_examples=150, deadline=None)
@given(
    fleet=st.lists(
        st.sampled_from(["amr-1", "amr-2", "amr-3"]), min_size=1, max_size=3, unique=True
    )
    .flatmap(lambda ids: st.tuples(*(histories(i) for i in ids)))
    .map(list),
    data=st.data(),
)
def test_shuffled_and_duplicated_reports_give_the_same_state_and_windows(
    fleet: list[list[RobotReport]], data: st.DataObject
) -> None:
    ordered = [r for history in fleet for r in history]
    dupes = data.draw(st.lists(st.sampled_from(ordered), max_size=15))
    arrival = data.draw(st.permutations(ordered + dupes))

    want_states, want_windows, want_late = run_fleet(ordered)
    got_states, got_windows, got_late = run_fleet(arrival)

    assert want_late == got_late == 0
    assert got_windows == want_windows
    assert sum(w.count for w in got_windows) == len(ordered)
    assert got_states.keys() == want_states.keys()
    for rid, want in want_states.items():
        got = got_states[rid].live
        assert (
            got.report
            == want.live.report
            == max((r for r in ordered if r.robot_id == rid), key=lambda r: r.order)
        )
        assert (got.online, got.last_seen) == (want.live.online, want.live.last_seen)
        # status_since cannot be order-free: stale reports never change live state
        # (DESIGN.md), so which run start was seen depends on arrival order. It must
        # match the model of what was applied, and the ordered feed gives the true one.
        mine = [r for r in arrival if r.robot_id == rid]
        assert got.status_since == status_since_model(mine)
        assert want.live.status_since == status_since_model(
            [r for r in ordered if r.robot_id == rid]
        )
        assert got_states[rid].applied + got_states[rid].stale + got_states[rid].duplicate == len(
            mine
        )


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            # Quarter seconds keep the arithmetic exact, so "== offline_after" is exact.
            st.integers(0, 4 * 70).map(lambda q: q / 4),
            st.sampled_from(["report", "duplicate", "tick", "tick"]),
        ),
        min_size=1,
        max_size=40,
    ),
    end_gap=st.integers(0, 4 * 70).map(lambda q: q / 4),
)
def test_one_offline_per_silence_and_one_back_online_per_return(
    steps: list[tuple[float, str]], end_gap: float
) -> None:
    now = NOW
    seq = 0
    state, _ = on_report(None, rep(seq), now, RULES)
    applied_at = [now]
    alerts = []
    for gap, action in steps:
        now += gap
        if action == "tick":
            state, e = on_tick(state, now, RULES)
        else:
            if action == "report":
                seq += 1
                applied_at.append(now)
            state, e = on_report(state, rep(seq), now, RULES)
        alerts += [a for a in e.alerts if a.kind in ("offline", "back_online")]
        if state.live.online:
            wake = next_wakeup(state)
            assert wake is not None and state.offline_at is not None
            assert wake <= state.offline_at
    now += end_gap
    state, e = on_tick(state, now, RULES)
    alerts += [a for a in e.alerts if a.kind in ("offline", "back_online")]

    silences = [b - a for a, b in pairwise(applied_at)]
    returns = sum(1 for s in silences if s >= RULES.offline_after_s)
    trailing = now - applied_at[-1] >= RULES.offline_after_s
    assert sum(a.kind == "offline" for a in alerts) == returns + trailing
    assert sum(a.kind == "back_online" for a in alerts) == returns
    # They alternate, starting with offline, and every id is distinct.
    assert [a.kind for a in alerts] == ["offline", "back_online"] * returns + (
        ["offline"] if trailing else []
    )
    assert len({a.id for a in alerts}) == len(alerts)
    assert state.live.online is not trailing


@settings(max_examples=150, deadline=None)
@given(
    history=histories("amr-1"),
    lateness=st.floats(0.0, 120.0),
    gaps=st.lists(st.floats(0.0, 60.0), min_size=25, max_size=25),
    data=st.data(),
)
def test_no_report_is_silently_lost(
    history: list[RobotReport], lateness: float, gaps: list[float], data: st.DataObject
) -> None:
    rules = msgspec.structs.replace(RULES, allowed_lateness_s=lateness)
    arrival = data.draw(st.permutations(history))
    state: RobotState | None = None
    now, counted, late = NOW, 0, []
    for r, gap in zip(arrival, gaps, strict=False):
        now += gap
        if state is not None:
            state, e = on_tick(state, now, rules)
            counted += sum(w.count for w in e.windows)
        state, e = on_report(state, r, now, rules)
        counted += sum(w.count for w in e.windows)
        late += e.late
    assert state is not None
    counted += sum(w.count for w in flush(state, rules)[1].windows)
    # Every report is either in exactly one closed window or routed as late.
    assert counted + len(late) == len(history)
    assert state.late == len(late)
