"""Event-time tumbling windows: epoch alignment, stats, watermark, lateness, restore."""

from __future__ import annotations

import math
import pickle
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dataflows.rules import Rules
from dataflows.windows import Windows, window_start
from fleetpulse.schema import Pose, RobotReport, WindowStats

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # 1704067200, a multiple of 60
T0_S = 1_704_067_200
NOW = 5_000.0  # processing time; deliberately unrelated to event time
RULES = Rules(
    offline_after_s=30.0,
    low_battery_pct=20.0,
    battery_ok_pct=25.0,
    window_s=60,
    allowed_lateness_s=10.0,
)
RID = "amr-1"


def rep(
    seq: int,
    at: float,
    *,
    boot: int = 0,
    battery: float = 80.0,
    x: float = 0.0,
    y: float = 0.0,
    speed: float = 0.0,
    errors: tuple[str, ...] = (),
) -> RobotReport:
    """A report of robot amr-1, ``at`` seconds of event time after T0."""
    return RobotReport(
        robot_id=RID,
        boot=boot,
        seq=seq,
        ts=T0 + timedelta(seconds=at),
        status="moving",
        battery=battery,
        pose=Pose(x=x, y=y, theta=0.0),
        speed=speed,
        errors=list(errors),
    )


def start_of(stats: WindowStats) -> float:
    return (stats.window_start - T0).total_seconds()


# --- alignment ------------------------------------------------------------------------


def test_windows_are_aligned_to_the_epoch() -> None:
    assert window_start(T0, 60) == T0_S
    assert window_start(T0 + timedelta(seconds=59, microseconds=999_999), 60) == T0_S
    assert window_start(T0 + timedelta(seconds=60), 60) == T0_S + 60
    assert window_start(T0 - timedelta(microseconds=1), 60) == T0_S - 60
    # The same instant written with another UTC offset falls into the same window.
    plus2 = T0.astimezone(timezone(timedelta(hours=2))) + timedelta(seconds=61)
    assert window_start(plus2, 60) == T0_S + 60
    # A length that does not divide a minute still aligns to the epoch, not to T0.
    assert window_start(T0, 7) % 7 == 0
    assert window_start(T0, 7) == T0_S - T0_S % 7


def test_closed_window_carries_aligned_bounds_and_all_stats() -> None:
    w = Windows()
    w.add(rep(0, 12.5, battery=50.0, x=0, y=0, speed=1.0, errors=("e1",)), NOW, RULES)
    w.add(rep(1, 20.0, battery=40.0, x=3, y=4, speed=2.5), NOW, RULES)
    w.add(rep(2, 30.0, battery=30.0, x=3, y=0, speed=0.5, errors=("e1", "e2")), NOW, RULES)
    [stats] = w.flush(RID, RULES)
    assert stats == WindowStats(
        robot_id=RID,
        window_start=T0,
        window_end=T0 + timedelta(seconds=60),
        count=3,
        battery_min=30.0,
        battery_avg=40.0,
        battery_max=50.0,
        distance_m=9.0,  # 5 + 4
        max_speed=2.5,
        error_count=3,
    )
    assert w.open == {}


def test_duplicates_count_once_first_arrival_wins() -> None:
    w = Windows()
    w.add(rep(0, 1, battery=50.0), NOW, RULES)
    w.add(rep(1, 2, battery=60.0), NOW, RULES)
    assert w.add(rep(0, 1, battery=10.0), NOW, RULES)  # same (boot, seq): ignored
    assert w.add(rep(1, 2, battery=60.0), NOW, RULES)
    [stats] = w.flush(RID, RULES)
    assert (stats.count, stats.battery_min) == (2, 50.0)


def test_distance_follows_boot_seq_order_not_arrival_order() -> None:
    w = Windows()
    # (boot, seq) order: (0,0) -> (3,4) -> (0,0) -> reboot -> (0,8) = 5 + 5 + 8 = 18 m.
    # Arrival order would give (0,8) -> (0,0) -> (0,0) -> (3,4) = 8 + 0 + 5 = 13 m.
    w.add(rep(0, 1.0, boot=1, x=0, y=8), NOW, RULES)
    w.add(rep(5, 2.0, x=0, y=0), NOW, RULES)
    w.add(rep(9, 3.0, x=0, y=0), NOW, RULES)
    w.add(rep(7, 4.0, x=3, y=4), NOW, RULES)
    [stats] = w.flush(RID, RULES)
    assert stats.count == 4
    assert stats.distance_m == pytest.approx(18.0)


def test_distance_ignores_event_time_order() -> None:
    # Clocks are never trusted for order: seq 1 carries the earlier timestamp.
    w = Windows()
    w.add(rep(0, 10.0, x=0, y=0), NOW, RULES)
    w.add(rep(1, 5.0, x=6, y=8), NOW, RULES)
    w.add(rep(2, 20.0, x=6, y=0), NOW, RULES)
    [stats] = w.flush(RID, RULES)
    assert stats.distance_m == pytest.approx(18.0)  # 10 + 8, not (0,0)->(6,8)->... by ts


# --- watermark and lateness -----------------------------------------------------------


def test_window_closes_when_event_time_passes_end_plus_lateness() -> None:
    w = Windows()
    assert w.add(rep(0, 5.0), NOW, RULES)
    assert w.close_due(RID, NOW, RULES) == []
    w.add(rep(1, 69.5), NOW, RULES)  # watermark 59.5 < 60
    assert w.close_due(RID, NOW, RULES) == []
    w.add(rep(2, 70.0), NOW, RULES)  # watermark 60: [0, 60) is complete
    [closed] = w.close_due(RID, NOW, RULES)
    assert (start_of(closed), closed.count) == (0.0, 1)
    assert list(w.open) == [T0_S + 60]


def test_report_within_lateness_still_counts() -> None:
    w = Windows()
    w.add(rep(0, 65.0), NOW, RULES)  # watermark 55
    assert w.add(rep(1, 50.0), NOW, RULES)  # window [0, 60) still open
    assert w.close_due(RID, NOW, RULES) == []
    stats = w.flush(RID, RULES)
    assert [(start_of(s), s.count) for s in stats] == [(0.0, 1), (60.0, 1)]


def test_report_for_closed_window_is_late_and_not_added() -> None:
    w = Windows()
    w.add(rep(0, 5.0), NOW, RULES)
    w.add(rep(1, 75.0), NOW, RULES)  # watermark 65
    [closed] = w.close_due(RID, NOW, RULES)
    assert not w.add(rep(2, 59.9), NOW, RULES)
    # A window that was never opened but lies behind the watermark is late too.
    assert not w.add(rep(3, -300.0), NOW, RULES)
    assert closed.count == 1
    assert [s.count for s in w.flush(RID, RULES)] == [1]


def test_watermark_advances_with_processing_time() -> None:
    w = Windows()
    w.add(rep(0, 30.0), NOW, RULES)
    # Window end 60 is 30 s of event time past the report, plus 10 s lateness.
    assert w.close_at == pytest.approx(NOW + 40.0)
    assert w.close_due(RID, NOW + 39.9, RULES) == []
    [closed] = w.close_due(RID, NOW + 40.0, RULES)
    assert closed.count == 1
    assert w.close_at is None


def test_watermark_never_regresses() -> None:
    w = Windows()
    w.add(rep(0, 30.0), NOW, RULES)
    w.close_due(RID, NOW + 35.0, RULES)
    before = w.watermark()
    # A report whose event time is behind processing time does not pull it back ...
    w.add(rep(1, 31.0), NOW + 35.0, RULES)
    assert w.watermark() == before
    # ... and neither does a processing clock that steps backwards.
    w.close_due(RID, NOW, RULES)
    assert w.watermark() == before


def test_rebase_keeps_the_watermark_across_downtime() -> None:
    w = Windows()
    w.add(rep(0, 30.0), NOW, RULES)
    before = w.watermark()
    w.rebase(NOW + 1000.0, RULES)
    assert w.watermark() == pytest.approx(before)
    assert w.close_at == pytest.approx(NOW + 1040.0)
    # The report Kafka replays after the restart still counts.
    assert w.add(rep(1, 31.0), NOW + 1000.0, RULES)
    assert w.close_due(RID, NOW + 1000.0, RULES) == []
    [closed] = w.close_due(RID, NOW + 1040.0, RULES)
    assert closed.count == 2


def test_flush_closes_everything_and_later_reports_are_late() -> None:
    patient = msgspec.structs.replace(RULES, allowed_lateness_s=1000.0)
    w = Windows()
    for i, at in enumerate([130.0, 5.0, 70.0]):
        assert w.add(rep(i, at), NOW, patient)
    assert w.close_due(RID, NOW, patient) == []
    assert [start_of(s) for s in w.flush(RID, patient)] == [0.0, 60.0, 120.0]
    assert w.open == {}
    assert w.close_at is None
    assert not w.add(rep(9, 150.0), NOW, patient)
    assert w.add(rep(10, 180.0), NOW, patient)


def test_windows_pickle_round_trip() -> None:
    w = Windows()
    for i, at in enumerate([5.0, 64.0, 1.0]):
        w.add(rep(i, at, x=i, errors=("x",) * i), NOW, RULES)
    restored = pickle.loads(pickle.dumps(w))
    assert restored == w
    assert restored.flush(RID, RULES) == w.flush(RID, RULES)


@settings(max_examples=300, deadline=None)
@given(
    at=st.floats(min_value=-1e6, max_value=1e6),
    now=st.floats(min_value=1.0, max_value=4e9),
    lateness=st.floats(min_value=0.0, max_value=1e4),
    window_s=st.integers(min_value=1, max_value=3600),
)
# Found by search: here (close_at - offset) + offset rounds below the window's end.
@example(at=186.871, now=3274712922.122266, lateness=74.179, window_s=60)
def test_a_wakeup_at_close_at_always_closes_a_window(
    at: float, now: float, lateness: float, window_s: int
) -> None:
    # Guards against a busy loop: if float rounding left the window open at close_at,
    # the dataflow would be woken at the same instant again and again.
    rules = Rules(
        offline_after_s=30.0,
        low_battery_pct=20.0,
        battery_ok_pct=25.0,
        window_s=window_s,
        allowed_lateness_s=lateness,
    )
    w = Windows()
    assert w.add(rep(0, at), now, rules)
    assert w.close_at is not None
    wake = w.close_at
    assert len(w.close_due(RID, wake, rules)) == 1
    assert w.close_at is None


# --- property: arrival order and duplicates do not matter ------------------------------

points = st.tuples(
    st.integers(min_value=0, max_value=2),  # boot
    st.integers(min_value=0, max_value=50),  # seq
    st.floats(min_value=0.0, max_value=300.0),  # event time after T0, s
    st.floats(min_value=0.0, max_value=100.0),  # battery
    st.floats(min_value=-1e3, max_value=1e3),  # x
    st.floats(min_value=-1e3, max_value=1e3),  # y
    st.floats(min_value=0.0, max_value=5.0),  # speed
    st.lists(st.sampled_from(["E1", "E2", "E3"]), max_size=3),  # errors
)


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(points, min_size=1, max_size=40, unique_by=lambda p: (p[0], p[1])),
    data=st.data(),
)
def test_any_permutation_with_duplicates_gives_the_same_stats(
    specs: list[tuple[int, int, float, float, float, float, float, list[str]]],
    data: st.DataObject,
) -> None:
    reports = [
        rep(seq, at, boot=boot, battery=b, x=x, y=y, speed=v, errors=tuple(errs))
        for boot, seq, at, b, x, y, v, errs in specs
    ]
    ordered = sorted(reports, key=lambda r: r.order)
    dupes = data.draw(st.lists(st.sampled_from(reports), max_size=10))
    arrival = data.draw(st.permutations(reports + dupes))
    patient = Rules(
        offline_after_s=30.0,
        low_battery_pct=20.0,
        battery_ok_pct=25.0,
        window_s=60,
        allowed_lateness_s=1e6,  # nothing closes before the flush
    )

    def run(seq: list[RobotReport]) -> list[WindowStats]:
        w = Windows()
        for r in seq:
            assert w.add(r, NOW, patient)
            assert w.close_due(RID, NOW, patient) == []
        return w.flush(RID, patient)

    expected = run(ordered)
    assert run(arrival) == expected
    assert sum(s.count for s in expected) == len(reports)
    assert all(math.isfinite(s.distance_m) for s in expected)
