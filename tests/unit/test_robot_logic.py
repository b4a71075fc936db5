"""The per-robot state machine: ordering, live state, alerts, offline, stuck, windows."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.records import Control
from dataflows.robot import Emits, RobotState, offline_at, on_control, on_progress, on_report
from dataflows.rules import Rules
from fleetpulse.errors import ConfigError
from fleetpulse.schema import STATUSES, Alert, LiveState, Pose, RobotReport, Status, WindowStats
from fleetpulse.settings import Settings

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a multiple of 60 s since the epoch
T0_S = 1_704_067_200
A = 10_000.0  # arrival clock (Kafka append time); deliberately unrelated to event time
RULES = Rules(
    offline_after_s=30.0,
    low_battery_pct=20.0,
    battery_ok_pct=25.0,
    window_s=60,
    allowed_lateness_s=10.0,
)
STUCK3 = msgspec.structs.replace(RULES, stuck_after=3)


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
    reports: Iterable[RobotReport], arrival: float = A, rules: Rules = RULES
) -> tuple[RobotState, list[Emits]]:
    """Run reports of one robot through on_report, all arriving at one time."""
    state: RobotState | None = None
    out = []
    for r in reports:
        state, emits = on_report(state, r, arrival, 0, rules)
        out.append(emits)
    assert state is not None
    return state, out


def reset(at: float, by: str = "op-1") -> Control:
    return Control("amr-1", "reset_order", by, 0, 99, round(at * 1000))


def kinds(emits: Emits) -> list[str]:
    return [a.kind for a in emits.alerts]


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def flush(state: RobotState, rules: Rules = RULES) -> list[WindowStats]:
    """Every open window of ``state`` closed (end of stream), without touching it."""
    return state.windows.copy().flush(state.robot_id, rules)


# --- rules ------------------------------------------------------------------------------


def test_rules_from_settings() -> None:
    s = Settings(
        offline_after_s=12.5,
        low_battery_pct=15.0,
        battery_ok_pct=30.0,
        window_s=120,
        allowed_lateness_s=3.0,
        max_future_s=60.0,
        max_age_s=3600.0,
        stuck_after=4,
        retire_after_s=86_400.0,
        max_robots=1000,
        shards=64,
    )
    assert Rules.from_settings(s) == Rules(
        offline_after_s=12.5,
        low_battery_pct=15.0,
        battery_ok_pct=30.0,
        window_s=120,
        allowed_lateness_s=3.0,
        max_future_s=60.0,
        max_age_s=3600.0,
        stuck_after=4,
        retire_after_s=86_400.0,
        max_robots_per_shard=16,  # 1000 / 64 rounded up: the fleet holds at most 1024
    )
    defaults = Rules.from_settings(Settings())
    assert (defaults.offline_after_s, defaults.retire_after_s) == (30.0, 604_800.0)
    assert defaults.max_robots_per_shard == 2_000_000 // 64
    assert Rules.from_settings(Settings(max_robots=0)).max_robots_per_shard == 0


def test_rules_refuse_a_hysteresis_that_would_flap() -> None:
    with pytest.raises(ConfigError, match="FLEETPULSE_BATTERY_OK_PCT"):
        Rules.from_settings(Settings(low_battery_pct=30.0, battery_ok_pct=30.0))


@pytest.mark.parametrize(
    "change",
    [
        {"offline_after_s": 0.0},
        {"window_s": 0},
        {"allowed_lateness_s": -1.0},
        {"allowed_lateness_s": math.inf},  # every window would close at infinity
        {"allowed_lateness_s": math.nan},
        {"max_future_s": -1.0},
        {"max_age_s": 0.0},
        {"stuck_after": 0},
        {"max_robots_per_shard": -1},
    ],
)
def test_rules_refuse_values_that_make_no_sense(change: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="must be"):
        Rules(**{**msgspec.structs.asdict(RULES), **change})


@pytest.mark.parametrize("retire", [1.0, 30.0, math.inf, math.nan])
def test_rules_refuse_retiring_before_offline(retire: float) -> None:
    # Offline after 30 s: a robot must be offline (its last state seen) before it goes.
    with pytest.raises(ConfigError, match="FLEETPULSE_RETIRE_AFTER_S"):
        Rules(**{**msgspec.structs.asdict(RULES), "retire_after_s": retire})


# --- ordering and live state ------------------------------------------------------------


def test_first_report_creates_online_live_state() -> None:
    r = rep(1, status="moving")
    state, emits = on_report(None, r, A, 3, RULES)
    assert state.live == LiveState(report=r, last_seen=A, online=True, status_since=r.ts, updated=A)
    assert (state.live.stale, state.live.resets, state.live.reset_pending) == (0, 0, False)
    assert emits.states == [state.live]
    assert (emits.applied, emits.stale, emits.duplicate, emits.late) == (1, 0, 0, [])
    assert offline_at(state, RULES) == A + 30.0
    assert (state.robot_id, state.partition) == ("amr-1", 3)


def test_stale_and_duplicate_reports_are_signs_of_life_and_change_nothing_else() -> None:
    state, _ = feed([rep(5, battery=70.0)])
    first = state.live
    state, dup = on_report(state, rep(5, battery=10.0), A + 1, 0, RULES)
    assert (dup.applied, dup.stale, dup.duplicate) == (0, 0, 1)
    state, stale = on_report(state, rep(4, battery=10.0, status="estop"), A + 2, 0, RULES)
    assert (stale.applied, stale.stale, stale.duplicate) == (0, 1, 0)
    assert state.live.report is first.report
    assert state.live.status_since == first.status_since
    assert dup.states == stale.states == []  # nothing worth writing
    assert dup.alerts == stale.alerts == []
    assert not state.battery_low
    assert (state.applied, state.stale, state.duplicate) == (1, 1, 1)
    # Both arrived, so the robot is alive: the offline deadline moved.
    assert (state.live.last_seen, state.live.stale) == (A + 2, 1)
    assert offline_at(state, RULES) == A + 32.0


def test_reboot_is_newer_than_any_seq_of_the_previous_boot() -> None:
    state, _ = feed([rep(1000, boot=0, at=50.0)])
    state, emits = on_report(state, rep(0, boot=1, at=1.0), A, 0, RULES)
    assert emits.applied == 1
    assert state.live.report.order == (1, 0)
    state, emits = on_report(state, rep(1001, boot=0, at=60.0), A, 0, RULES)
    assert emits.stale == 1
    assert state.live.report.order == (1, 0)


def test_clocks_are_not_used_for_order() -> None:
    state, _ = feed([rep(1, at=100.0)])
    state, emits = on_report(state, rep(2, at=5.0), A, 0, RULES)  # newer, older clock
    assert emits.applied == 1
    assert state.live.report.seq == 2


def test_status_since_is_the_event_time_the_status_was_entered() -> None:
    state, _ = feed([rep(1, status="idle"), rep(2, status="idle")])
    assert state.live.status_since == T0 + timedelta(seconds=1)
    state, _ = on_report(state, rep(3, status="moving"), A, 0, RULES)
    assert state.live.status_since == T0 + timedelta(seconds=3)
    state, _ = on_report(state, rep(7, status="moving"), A + 5, 0, RULES)
    assert state.live.status_since == T0 + timedelta(seconds=3)
    assert state.live.last_seen == A + 5


def test_updated_strictly_increases_even_at_one_arrival_time() -> None:
    # Redis orders a robot's changes by `updated`: two changes may share an arrival ms.
    state, out = feed([rep(1), rep(2), rep(3)])
    assert [s.updated for e in out for s in e.states] == pytest.approx([A, A + 0.001, A + 0.002])
    # A control record read with an older append time still orders after them.
    state, e = on_control(state, reset(A - 5), RULES)
    assert e.states[0].updated == pytest.approx(A + 0.003)
    assert e.states[0].updated > A + 0.002


# --- alerts -----------------------------------------------------------------------------


def test_low_battery_hysteresis() -> None:
    levels = [50.0, 20.0, 19.0, 22.0, 24.9, 25.0, 22.0, 20.1, 20.0, 100.0]
    state, out = feed([rep(i, battery=b) for i, b in enumerate(levels)])
    fired = [(i, a.kind, a.id) for i, e in enumerate(out) for a in e.alerts]
    assert fired == [
        (1, "low_battery", "amr-1:low_battery:0:0:1"),
        # 19, 22, 24.9 lie at/below or between the thresholds: still low, nothing new
        (5, "battery_ok", "amr-1:battery_ok:0:0:5"),
        # 22 and 20.1 are between the thresholds on the way down: not low yet
        (8, "low_battery", "amr-1:low_battery:0:0:8"),
        (9, "battery_ok", "amr-1:battery_ok:0:0:9"),
    ]
    assert not state.battery_low


def test_first_report_with_low_battery_alerts() -> None:
    state, [emits] = feed([rep(3, boot=2, battery=5.0)])
    [alert] = emits.alerts
    assert alert == Alert(
        id="amr-1:low_battery:0:2:3",
        robot_id="amr-1",
        kind="low_battery",
        boot=2,
        seq=3,
        at=T0 + timedelta(seconds=3),
        detail="5%",
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
        ("amr-1:error:0:0:2", "E_MOTOR"),
        ("amr-1:error:0:0:5", "E_LIDAR, E_CAM"),
        ("amr-1:error:0:0:7", "E_CAM"),
        ("amr-1:error:0:0:9", ""),
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
    assert out[3].alerts[0].id == "amr-1:estop:0:0:4"


# --- offline on the arrival clock -------------------------------------------------------


def test_offline_exactly_once_then_back_online_exactly_once() -> None:
    state, _ = feed([rep(1)])
    state, e = on_progress(state, A + 29.999, RULES)
    assert (e.states, e.alerts) == ([], [])
    state, e = on_progress(state, A + 30.0, RULES)
    [offline] = e.alerts
    assert (offline.kind, offline.id, offline.at) == (
        "offline",
        "amr-1:offline:10030000",
        utc(A + 30),
    )
    assert (offline.boot, offline.seq) == (0, 1)
    [live] = e.states
    assert (live.online, live.report.seq, live.last_seen, live.updated) == (False, 1, A, A + 30)
    assert offline_at(state, RULES) is None
    for t in (A + 30.0, A + 31.0, A + 500.0):
        state, e = on_progress(state, t, RULES)
        assert (e.states, e.alerts) == ([], [])
    # Any report that arrives is a sign of life, a duplicate too.
    state, e = on_report(state, rep(1), A + 600, 0, RULES)
    [back] = e.alerts
    assert (back.kind, back.id, back.at) == (
        "back_online",
        "amr-1:back_online:10600000",
        utc(A + 600),
    )
    [live] = e.states
    assert (live.online, live.report.seq, live.last_seen) == (True, 1, A + 600)
    state, e = on_report(state, rep(2), A + 601, 0, RULES)
    assert (e.alerts, e.applied) == ([], 1)
    # The next silence is a new one: one more offline, named after its deadline.
    state, e = on_progress(state, A + 631, RULES)
    assert [a.id for a in e.alerts] == ["amr-1:offline:10631000"]


def test_a_stale_report_brings_an_offline_robot_back_without_applying() -> None:
    state, _ = feed([rep(5)])
    state, _ = on_progress(state, A + 40, RULES)
    assert not state.live.online
    state, e = on_report(state, rep(3), A + 50, 0, RULES)
    assert (kinds(e), e.stale, e.applied) == (["back_online"], 1, 0)
    [live] = e.states
    assert (live.online, live.report.seq, live.stale, live.last_seen) == (True, 5, 1, A + 50)
    assert offline_at(state, RULES) == A + 80


def test_report_after_a_silence_no_progress_showed_emits_offline_then_back_online() -> None:
    state, _ = feed([rep(1)])
    state, e = on_report(state, rep(2), A + 45.0, 0, RULES)
    assert [(a.kind, a.id, a.at) for a in e.alerts] == [
        ("offline", "amr-1:offline:10030000", utc(A + 30)),
        ("back_online", "amr-1:back_online:10045000", utc(A + 45)),
    ]
    assert [(s.online, s.report.seq, s.updated) for s in e.states] == [
        (False, 1, A + 30),
        (True, 2, A + 45),
    ]


@settings(max_examples=150, deadline=None)
@given(
    # Quarter seconds keep the arithmetic exact, so "at the deadline" is exact.
    gap=st.integers(0, 4 * 100).map(lambda q: q / 4),
    mark=st.floats(0.0, 1.0),
    event=st.integers(0, 4 * 100).map(lambda q: q / 4),
    stale=st.booleans(),
)
def test_the_offline_decision_is_the_same_whether_progress_or_the_next_report_shows_it(
    gap: float, mark: float, event: float, stale: bool
) -> None:
    state, _ = feed([rep(5, at=2.0), rep(6, at=3.0)])
    nxt = rep(4 if stale else 7, at=event)
    by_report, direct = on_report(state, nxt, A + gap, 0, RULES)
    by_progress, e1 = on_progress(state, A + gap * mark, RULES)
    by_progress, e2 = on_report(by_progress, nxt, A + gap, 0, RULES)
    assert by_progress == by_report
    for what in ("states", "alerts", "windows", "late"):
        assert getattr(e1, what) + getattr(e2, what) == getattr(direct, what)
    assert kinds(direct)[:1] == (["offline"] if gap >= 30 else [])


# --- stuck and the operator's reset -----------------------------------------------------


def test_stuck_after_n_stale_reports_in_a_row_one_alert_per_run() -> None:
    state, _ = feed([rep(10)], rules=STUCK3)
    out = []
    for i, seq in enumerate([1, 10, 2, 3, 4]):  # stale, duplicate (no count), stale ...
        state, e = on_report(state, rep(seq), A + 1 + i, 0, STUCK3)
        out.append(e)
    assert [kinds(e) for e in out] == [[], [], [], ["stuck"], []]
    stuck = out[3].alerts[0]
    assert (stuck.id, stuck.boot, stuck.seq, stuck.at) == ("amr-1:stuck:0:0:10", 0, 10, utc(A + 4))
    assert "reset-order" in stuck.detail
    # While stuck every stale report is written with its count; before, none is.
    assert [[s.stale for s in e.states] for e in out] == [[], [], [], [3], [4]]
    assert state.stuck
    # An applied report ends the run; the next run raises its own alert.
    state, e = on_report(state, rep(11), A + 10, 0, STUCK3)
    assert (e.states[0].stale, kinds(e), state.stuck) == (0, [], False)
    alerts = []
    for i in range(4):
        state, e = on_report(state, rep(i), A + 11 + i, 0, STUCK3)
        alerts += e.alerts
    assert [a.id for a in alerts] == ["amr-1:stuck:0:0:11"]


def test_reset_applies_the_next_report_whatever_its_order() -> None:
    state, _ = feed([rep(100, boot=3, at=1.0)], rules=STUCK3)
    for i in range(3):  # the robot was reflashed: boot 0 again, stale forever
        state, e = on_report(state, rep(i, at=2.0 + i), A + 1 + i, 0, STUCK3)
    assert kinds(e) == ["stuck"]

    before = state
    state, e = on_control(state, reset(A + 10), STUCK3)
    [live] = e.states
    assert (live.resets, live.reset_pending, live.stale, live.updated) == (1, True, 0, A + 10)
    assert live.report == before.live.report
    [alert] = e.alerts
    assert (alert.kind, alert.id, alert.boot, alert.seq, alert.at) == (
        "order_reset",
        "amr-1:order_reset:1",
        3,
        100,
        utc(A + 10),
    )
    assert "by op-1" in alert.detail
    assert not state.stuck

    state, e = on_report(state, rep(3, at=5.0, status="estop"), A + 11, 0, STUCK3)
    assert e.applied == 1
    [live] = e.states
    assert (live.report.order, live.resets, live.reset_pending) == ((0, 3), 1, False)
    assert [a.id for a in e.alerts] == ["amr-1:estop:1:0:3"]  # ids of the new generation
    # From here on the order is the robot's new one again.
    state, e = on_report(state, rep(2, at=6.0), A + 12, 0, STUCK3)
    assert (e.stale, e.applied) == (1, 0)
    for i in range(2):
        state, e = on_report(state, rep(1, at=7.0), A + 13 + i, 0, STUCK3)
    assert [a.id for a in e.alerts] == ["amr-1:stuck:1:0:3"]


def test_a_second_reset_before_any_report_counts_again() -> None:
    state, _ = feed([rep(5)])
    state, _ = on_control(state, reset(A + 1), RULES)
    state, e = on_control(state, reset(A + 2, by="op-2"), RULES)
    assert (e.alerts[0].id, state.live.resets, state.live.reset_pending) == (
        "amr-1:order_reset:2",
        2,
        True,
    )


# --- windows through the state machine --------------------------------------------------


def test_progress_closes_a_window_at_exactly_its_close_at() -> None:
    state, _ = feed([rep(1, at=30.0)])
    assert state.windows.close_at(RULES) == A + 40.0  # end 60 + lateness 10, 30 s ahead
    state, e = on_progress(state, A + 39.999, RULES)
    assert (kinds(e), e.windows) == (["offline"], [])
    state, e = on_progress(state, A + 40.0, RULES)
    assert [(w.window_start, w.count, w.part) for w in e.windows] == [(T0, 1, 0)]
    assert (e.states, e.alerts) == ([], [])
    assert state.windows.open == {}


def test_a_report_arriving_at_its_window_close_is_late_and_closes_it() -> None:
    state, _ = feed([rep(1, at=5.0)])  # [0, 60) closes at A + 65
    late = rep(2, at=59.0)
    state, e = on_report(state, late, A + 65.0, 0, RULES)
    assert e.late == [late]
    assert [w.count for w in e.windows] == [1]
    assert (e.applied, state.late, state.live.report) == (1, 1, late)


def test_late_report_is_counted_routed_and_still_applied_if_newer() -> None:
    state, _ = feed([rep(1, at=5.0)])
    state, e = on_report(state, rep(2, at=100.0), A, 0, RULES)  # watermark 90
    assert [(w.window_start, w.count) for w in e.windows] == [(T0, 1)]
    late = rep(3, at=10.0, status="charging")
    state, e = on_report(state, late, A, 0, RULES)
    assert e.late == [late]
    assert state.late == 1
    assert e.applied == 1
    assert state.live.report == late
    assert [(w.window_start, w.count) for w in flush(state)] == [(T0 + timedelta(seconds=60), 1)]


def test_a_clock_that_went_back_rebases_the_windows() -> None:
    # The robot's clock ran an hour ahead, then was set right: its reports (newer in
    # (boot, seq), so applied) are late for 70 s of arrival time, then count again.
    state, _ = feed([rep(1, at=3600.0)])
    state, e = on_progress(state, A + 70, RULES)
    assert [(w.window_start, w.part) for w in e.windows] == [(T0 + timedelta(seconds=3600), 0)]
    late = []
    for i, gap in enumerate([80.0, 100.0, 149.0]):
        state, e = on_report(state, rep(2 + i, at=gap - 80), A + gap, 0, RULES)
        assert (e.applied, len(e.late), e.windows) == (1, 1, [])
        late += e.late
    state, e = on_report(state, rep(5, at=70.0), A + 150.0, 0, RULES)
    assert (e.applied, e.late, e.windows) == (1, [], [])
    assert state.late == 3
    # Minutes of the new clock behind the newest minute closed before get part 1.
    state, e = on_progress(state, A + 1000.0, RULES)
    assert [(w.window_start, w.count, w.part) for w in e.windows] == [
        (T0 + timedelta(seconds=60), 1, 1)
    ]


def test_stale_report_still_counts_in_its_window() -> None:
    state, _ = feed([rep(2, at=20.0, x=3, y=4), rep(1, at=10.0)])
    assert state.stale == 1
    [w] = flush(state)
    assert (w.count, w.distance_m) == (2, 5.0)


def test_window_boundaries_are_epoch_aligned() -> None:
    state, out = feed([rep(1, at=59.999), rep(2, at=60.0), rep(3, at=119.0)])
    # The report at 119 s moved the watermark to 109 s: [0, 60) closed on the way.
    closed = [w for e in out for w in e.windows] + flush(state)
    assert [(w.window_start, w.window_end, w.count) for w in closed] == [
        (T0, T0 + timedelta(seconds=60), 1),
        (T0 + timedelta(seconds=60), T0 + timedelta(seconds=120), 2),
    ]


def test_distance_in_boot_seq_order_when_reports_arrive_shuffled() -> None:
    path = [(0.0, 0.0), (3.0, 4.0), (3.0, 0.0), (0.0, 0.0)]  # 5 + 4 + 3 = 12 m
    reports = [rep(i, at=float(i), x=x, y=y) for i, (x, y) in enumerate(path)]
    state, _ = feed([reports[2], reports[0], reports[3], reports[1]])
    assert flush(state)[0].distance_m == pytest.approx(12.0)


# --- persistence ------------------------------------------------------------------------


def busy_state() -> RobotState:
    """A state with something in every field: low battery, windows, stale, reset, offline."""
    state, _ = feed(
        [
            rep(1, battery=10.0, errors=["E1"], x=1.0),
            rep(3, at=70.0, battery=12.0),
            rep(2, status="estop"),
        ],
        rules=STUCK3,
    )
    state, _ = on_control(state, reset(A + 1), STUCK3)
    state, _ = on_progress(state, A + 31.0, STUCK3)
    return state


def test_state_round_trips_through_pickle_and_msgpack() -> None:
    state = busy_state()
    assert (state.battery_low, state.live.online, state.live.reset_pending) == (True, False, True)
    assert state.windows.open
    for again in (
        pickle.loads(pickle.dumps(state)),
        msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=RobotState),
    ):
        assert again == state
        assert flush(again) == flush(state)
        # The restored state goes on exactly like the original.
        assert on_report(again, rep(9, at=75.0), A + 90, 1, STUCK3) == on_report(
            state, rep(9, at=75.0), A + 90, 1, STUCK3
        )


def test_a_snapshot_without_the_newer_fields_still_loads() -> None:
    # The persisted format's promise: new fields have defaults (see RobotState).
    live = {
        "report": msgspec.to_builtins(rep(1)),
        "last_seen": A,
        "online": True,
        "status_since": T0.isoformat(),
    }
    state = msgspec.msgpack.decode(msgspec.msgpack.encode({"live": live}), type=RobotState)
    assert state.live == LiveState(report=rep(1), last_seen=A, online=True, status_since=T0)
    assert (state.partition, state.stuck, state.windows.open, state.applied) == (0, False, {}, 0)


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
        states[r.robot_id], e = on_report(states.get(r.robot_id), r, A, 0, PATIENT)
        windows += e.windows
        late += len(e.late)
    for state in states.values():
        windows += flush(state, PATIENT)
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
        assert (got.online, got.last_seen) == (want.live.online, want.live.last_seen) == (True, A)
        # status_since cannot be order-free: stale reports never change live state, so
        # which run start was seen depends on arrival order. It must match the model of
        # what was applied, and the ordered feed gives the true one.
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
            st.sampled_from(["report", "duplicate", "stale", "progress", "progress"]),
        ),
        min_size=1,
        max_size=40,
    ),
    end_gap=st.integers(0, 4 * 70).map(lambda q: q / 4),
)
def test_one_offline_per_silence_and_one_back_online_per_return(
    steps: list[tuple[float, str]], end_gap: float
) -> None:
    now = A
    seq = 1
    state, _ = on_report(None, rep(seq), now, 0, RULES)
    arrived = [now]  # every report is a sign of life, applied or not
    alerts: list[Alert] = []
    for gap, action in steps:
        now += gap
        if action == "progress":
            state, e = on_progress(state, now, RULES)
        else:
            if action == "report":
                seq += 1
            state, e = on_report(state, rep(0 if action == "stale" else seq), now, 0, RULES)
            arrived.append(now)
        alerts += [a for a in e.alerts if a.kind in ("offline", "back_online")]
        if state.live.online:
            assert offline_at(state, RULES) == arrived[-1] + 30.0
    now += end_gap
    state, e = on_progress(state, now, RULES)
    alerts += [a for a in e.alerts if a.kind in ("offline", "back_online")]

    silent = [a for a, b in pairwise(arrived) if b - a >= RULES.offline_after_s]
    trailing = now - arrived[-1] >= RULES.offline_after_s
    deadlines = [t + 30.0 for t in silent] + ([arrived[-1] + 30.0] if trailing else [])
    offline = [a for a in alerts if a.kind == "offline"]
    # One offline per silence, whoever noticed it, stamped with the silence's deadline.
    assert [a.at for a in offline] == [utc(t) for t in deadlines]
    assert [a.id for a in offline] == [f"amr-1:offline:{round(t * 1000)}" for t in deadlines]
    assert sum(a.kind == "back_online" for a in alerts) == len(silent)
    # They alternate, starting with offline, and every id is distinct.
    assert [a.kind for a in alerts] == ["offline", "back_online"] * len(silent) + (
        ["offline"] if trailing else []
    )
    assert len({a.id for a in alerts}) == len(alerts)
    assert state.live.online is not trailing


@settings(max_examples=150, deadline=None)
@given(
    history=histories("amr-1"),
    lateness=st.floats(0.0, 120.0),
    gaps=st.lists(st.floats(0.0, 60.0), min_size=25, max_size=25),
    marks=st.lists(st.booleans(), min_size=25, max_size=25),
    data=st.data(),
)
def test_no_report_is_silently_lost(
    history: list[RobotReport],
    lateness: float,
    gaps: list[float],
    marks: list[bool],
    data: st.DataObject,
) -> None:
    rules = msgspec.structs.replace(RULES, allowed_lateness_s=lateness)
    arrival = data.draw(st.permutations(history))
    state: RobotState | None = None
    now, counted, late = A, 0, []
    for r, gap, mark in zip(arrival, gaps, marks, strict=False):
        now += gap
        if state is not None and mark:
            state, e = on_progress(state, now, rules)
            counted += sum(w.count for w in e.windows)
        state, e = on_report(state, r, now, 0, rules)
        counted += sum(w.count for w in e.windows)
        late += e.late
    assert state is not None
    counted += sum(w.count for w in flush(state, rules))
    # Every report is either in exactly one closed window or routed as late.
    assert counted + len(late) == len(history)
    assert state.late == len(late)


Step = tuple[str, int, float, float]  # (what, seq, event time after T0, arrival gap)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["report", "report", "report", "progress", "control"]),
            st.integers(0, 8),
            st.floats(-200.0, 400.0),
            st.floats(0.0, 50.0),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_every_step_returns_a_new_state_and_leaves_its_input_untouched(
    steps: list[Step],
) -> None:
    state, e = on_report(None, rep(4, battery=15.0), A, 0, STUCK3)
    updated = [s.updated for s in e.states]
    now = A
    for what, seq, at, gap in steps:
        now += gap
        before = copy.deepcopy(state)
        encoded = msgspec.msgpack.encode(state)
        if what == "report":
            r = rep(seq, at=at, battery=seq * 10.0, x=at, errors=["E"] * (seq % 2))
            new, e = on_report(state, r, now, 0, STUCK3)
        elif what == "progress":
            new, e = on_progress(state, now, STUCK3)
        else:
            new, e = on_control(state, reset(now), STUCK3)
        assert state == before
        assert msgspec.msgpack.encode(state) == encoded
        assert list(state.windows.open.values()) == list(before.windows.open.values())
        assert new is not state
        updated += [s.updated for s in e.states]
        state = new
    # Every change the store sees is strictly after the previous one.
    assert all(a < b for a, b in pairwise(updated))
