"""Event-time tumbling windows on the arrival clock: alignment, stats, lateness, rebase."""

from __future__ import annotations

import copy
import math
import pickle
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import msgspec
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from dataflows.rules import Rules
from dataflows.windows import Windows, window_fits, window_start
from fleetpulse.schema import Pose, RobotReport, WindowStats

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # 1704067200, a multiple of 60
T0_S = 1_704_067_200
# Arrival clock (Kafka append time), deliberately unrelated to event time: only its
# differences matter, the watermark's offset absorbs the rest.
A = 5_000.0
RULES = Rules(
    offline_after_s=30.0,
    low_battery_pct=20.0,
    battery_ok_pct=25.0,
    window_s=60,
    allowed_lateness_s=10.0,
)
PATIENT = msgspec.structs.replace(RULES, allowed_lateness_s=1e6)  # nothing closes early
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


def spans(closed: list[WindowStats]) -> list[tuple[float, int, int]]:
    """(start after T0, count, part) of each closed window."""
    return [(start_of(s), s.count, s.part) for s in closed]


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


def test_window_fits_only_inside_years_1_to_9999_utc() -> None:
    last = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    first = datetime(1, 1, 1, tzinfo=UTC)
    assert window_fits(T0, 60)
    # The last whole minute ends at 10000-01-01, which no datetime can hold.
    assert not window_fits(last, 60)
    assert window_fits(last - timedelta(seconds=60), 60)
    assert window_fits(last, 1) is False  # even one second: its end is 10000-01-01
    # Year 9999 local time can be year 10000 in UTC.
    minus5 = datetime(9999, 12, 31, 20, tzinfo=timezone(timedelta(hours=-5)))
    assert not window_fits(minus5, 60)
    # 0001-01-01 is a multiple of 60 s before the epoch, not of 7 s.
    assert window_fits(first, 60)
    assert not window_fits(first, 7)
    assert window_fits(first + timedelta(seconds=7), 7)
    # A window of millions of years fits nowhere (and computing that must not overflow).
    assert window_start(T0, 10**15) == 0
    assert not window_fits(T0, 10**15)


def test_closed_window_carries_aligned_bounds_and_all_stats() -> None:
    w = Windows()
    w.add(rep(0, 12.5, battery=50.0, x=0, y=0, speed=1.0, errors=("e1",)), A, RULES)
    w.add(rep(1, 20.0, battery=40.0, x=3, y=4, speed=2.5), A, RULES)
    w.add(rep(2, 30.0, battery=30.0, x=3, y=0, speed=0.5, errors=("e1", "e2")), A, RULES)
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
        part=0,
    )
    assert w.open == {}


def test_duplicates_count_once_first_arrival_wins() -> None:
    w = Windows()
    w.add(rep(0, 1, battery=50.0), A, RULES)
    w.add(rep(1, 2, battery=60.0), A, RULES)
    assert w.add(rep(0, 1, battery=10.0), A, RULES)  # same (boot, seq): ignored
    assert w.add(rep(1, 2, battery=60.0), A, RULES)
    [stats] = w.flush(RID, RULES)
    assert (stats.count, stats.battery_min) == (2, 50.0)


def test_distance_follows_boot_seq_order_not_arrival_order() -> None:
    w = Windows()
    # (boot, seq) order: (0,0) -> (3,4) -> (0,0) -> reboot -> (0,8) = 5 + 5 + 8 = 18 m.
    # Arrival order would give (0,8) -> (0,0) -> (0,0) -> (3,4) = 8 + 0 + 5 = 13 m.
    w.add(rep(0, 1.0, boot=1, x=0, y=8), A, RULES)
    w.add(rep(5, 2.0, x=0, y=0), A, RULES)
    w.add(rep(9, 3.0, x=0, y=0), A, RULES)
    w.add(rep(7, 4.0, x=3, y=4), A, RULES)
    [stats] = w.flush(RID, RULES)
    assert stats.count == 4
    assert stats.distance_m == pytest.approx(18.0)


def test_distance_ignores_event_time_order() -> None:
    # Clocks are never trusted for order: seq 1 carries the earlier timestamp.
    w = Windows()
    w.add(rep(0, 10.0, x=0, y=0), A, RULES)
    w.add(rep(1, 5.0, x=6, y=8), A, RULES)
    w.add(rep(2, 20.0, x=6, y=0), A, RULES)
    [stats] = w.flush(RID, RULES)
    assert stats.distance_m == pytest.approx(18.0)  # 10 + 8, not (0,0)->(6,8)->... by ts


# --- watermark on the arrival clock ---------------------------------------------------


def test_the_watermark_trails_the_newest_report_and_moves_with_arrival_time() -> None:
    w = Windows()
    assert w.watermark(A) == -math.inf
    assert w.close_at(RULES) is None
    w.add(rep(0, 30.0), A, RULES)
    # offset = ts - lateness - arrival: 10 s behind the report at its arrival, and
    # moving on with the arrival clock while nothing else arrives.
    assert w.watermark(A) == T0_S + 20.0
    assert w.watermark(A + 5.0) == T0_S + 25.0
    # [0, 60) is complete once the watermark reaches 60: 40 s of arrival time later.
    assert w.close_at(RULES) == A + 40.0


def test_an_older_event_time_never_pulls_the_watermark_back() -> None:
    w = Windows()
    w.add(rep(0, 30.0), A, RULES)
    before = w.offset
    assert w.add(rep(1, 25.0), A + 1.0, RULES)  # behind: counts, offset unchanged
    assert w.offset == before
    assert w.watermark(A + 1.0) == T0_S + 21.0
    # A report ahead of the arrival clock moves it forward at once.
    assert w.add(rep(2, 100.0), A + 2.0, RULES)
    assert w.watermark(A + 2.0) == T0_S + 90.0


def test_windows_close_when_progress_reaches_close_at_exactly() -> None:
    w = Windows()
    w.add(rep(0, 30.0), A, RULES)
    w.add(rep(1, 65.0), A + 35.0, RULES)  # the same offset: [60, 120) closes 60 s later
    assert (w.close_at(RULES), w.offset) == (A + 40.0, T0_S + 20.0 - A)
    assert w.close_due(RID, A + 39.999, RULES) == []
    [closed] = w.close_due(RID, A + 40.0, RULES)
    assert (start_of(closed), closed.count) == (0.0, 1)
    assert w.close_at(RULES) == A + 100.0
    # A progress mark that goes back changes nothing.
    assert w.close_due(RID, A, RULES) == []
    assert [start_of(s) for s in w.close_due(RID, A + 100.0, RULES)] == [60.0]
    assert w.close_at(RULES) is None


def test_a_newer_event_time_closes_windows_without_the_arrival_clock_moving() -> None:
    w = Windows()
    assert w.add(rep(0, 5.0), A, RULES)
    w.add(rep(1, 69.5), A, RULES)  # watermark 59.5 < 60
    assert w.close_due(RID, A, RULES) == []
    w.add(rep(2, 70.0), A, RULES)  # watermark 60: [0, 60) is complete
    [closed] = w.close_due(RID, A, RULES)
    assert (start_of(closed), closed.count) == (0.0, 1)
    assert list(w.open) == [T0_S + 60]


def test_a_report_is_late_once_the_arrival_clock_passes_its_window_close() -> None:
    w = Windows()
    w.add(rep(0, 5.0), A, RULES)
    assert w.close_at(RULES) == A + 65.0
    # The same report (event time 59 s) counts a hair before the close and is late at it:
    # lateness depends on when it arrived, not on when the flow got to read it.
    early = w.copy()
    assert early.add(rep(1, 59.0), A + 64.999, RULES)
    assert not w.add(rep(1, 59.0), A + 65.0, RULES)
    assert [s.count for s in early.flush(RID, RULES)] == [2]
    assert [s.count for s in w.flush(RID, RULES)] == [1]


def test_report_within_lateness_still_counts() -> None:
    w = Windows()
    w.add(rep(0, 65.0), A, RULES)  # watermark 55
    assert w.add(rep(1, 50.0), A, RULES)  # window [0, 60) still open
    assert w.close_due(RID, A, RULES) == []
    assert spans(w.flush(RID, RULES)) == [(0.0, 1, 0), (60.0, 1, 0)]


def test_a_closed_window_stays_closed_whatever_the_arrival_of_later_reports() -> None:
    w = Windows()
    w.add(rep(0, 5.0), A, RULES)
    [closed] = w.close_due(RID, A + 65.0, RULES)
    # A report arriving (on another clock reading) before that close is still late:
    # the closed window's end bounds the watermark from below.
    assert w.watermark(A) == T0_S + 60.0
    assert not w.add(rep(1, 59.9), A, RULES)
    # A window that was never opened but lies behind the watermark is late too.
    assert not w.add(rep(2, -300.0), A + 100.0, RULES)
    assert w.add(rep(3, 60.0), A, RULES)
    assert closed.count == 1
    assert spans(w.flush(RID, RULES)) == [(60.0, 1, 0)]


def test_flush_closes_everything_and_later_reports_are_late() -> None:
    patient = msgspec.structs.replace(RULES, allowed_lateness_s=1000.0)
    w = Windows()
    for i, at in enumerate([130.0, 5.0, 70.0]):
        assert w.add(rep(i, at), A, patient)
    assert w.close_due(RID, A, patient) == []
    assert [start_of(s) for s in w.flush(RID, patient)] == [0.0, 60.0, 120.0]
    assert w.open == {}
    assert w.close_at(patient) is None
    assert not w.add(rep(9, 150.0), A, patient)
    assert w.add(rep(10, 180.0), A, patient)


# --- a clock that went back -------------------------------------------------------------


def ahead_then_back() -> Windows:
    """Windows of a robot whose clock ran an hour ahead, then was set right at A + 80.

    [3600, 3660) closed at A + 70 and [3660, 3720) is open when the late reports start.
    """
    w = Windows()
    assert w.add(rep(0, 3600.0), A, RULES)
    assert w.add(rep(1, 3650.0), A + 50.0, RULES)
    assert w.add(rep(2, 3665.0), A + 65.0, RULES)
    assert spans(w.close_due(RID, A + 70.0, RULES)) == [(3600.0, 2, 0)]
    return w


def test_late_reports_for_window_plus_lateness_mean_the_clock_went_back() -> None:
    w = ahead_then_back()
    assert not w.add(rep(3, 20.0), A + 80.0, RULES)
    assert not w.clock_went_back(A + 80.0, RULES)
    assert not w.add(rep(4, 79.0), A + 149.999, RULES)
    assert not w.clock_went_back(A + 149.999, RULES)
    # window_s + allowed_lateness_s = 70 s of late reports without a break.
    assert not w.add(rep(5, 90.0), A + 150.0, RULES)
    assert w.clock_went_back(A + 150.0, RULES)


def test_a_report_in_time_breaks_the_run_of_late_ones() -> None:
    w = ahead_then_back()
    assert not w.add(rep(3, 20.0), A + 80.0, RULES)
    assert w.add(rep(4, 3700.0), A + 100.0, RULES)  # still the robot's old clock, in time
    assert not w.add(rep(5, 90.0), A + 150.0, RULES)
    assert not w.clock_went_back(A + 150.0, RULES)  # the run started again at A + 150
    assert not w.add(rep(6, 95.0), A + 219.0, RULES)
    assert w.clock_went_back(A + 220.0, RULES)


def test_rebase_closes_what_is_open_and_reopened_minutes_get_a_part() -> None:
    w = ahead_then_back()
    for i, (at, arrival) in enumerate([(20.0, 80.0), (79.0, 149.0), (90.0, 150.0)]):
        assert not w.add(rep(3 + i, at), A + arrival, RULES)
    closed = w.rebase(RID, rep(5, 90.0), A + 150.0, RULES)
    assert spans(closed) == [(3660.0, 1, 0)]  # the open window of the old clock, as it was
    assert w.open == {}
    assert (w.part, w.late_since) == (1, None)
    # The watermark restarts from the new clock: 10 s behind the report at its arrival.
    assert w.watermark(A + 150.0) == T0_S + 80.0
    assert w.add(rep(5, 90.0), A + 150.0, RULES)
    assert w.add(rep(6, 150.0), A + 210.0, RULES)
    # Later the clock reaches minutes never closed before: part 0, like any other.
    assert w.add(rep(7, 3725.0), A + 300.0, RULES)
    closed = w.close_due(RID, A + 300.0, RULES)
    assert spans(closed) == [(60.0, 1, 1), (120.0, 1, 1)]
    assert spans(w.flush(RID, RULES)) == [(3720.0, 1, 0)]


def test_a_second_clock_jump_numbers_its_parts_apart_from_the_first() -> None:
    w = ahead_then_back()
    w.add(rep(3, 20.0), A + 80.0, RULES)
    w.rebase(RID, rep(4, 20.0), A + 150.0, RULES)
    assert w.add(rep(4, 20.0), A + 150.0, RULES)
    assert spans(w.close_due(RID, A + 200.0, RULES)) == [(0.0, 1, 1)]
    # The same minute after the clock went back a second time is part 2, not part 1.
    assert not w.add(rep(5, 10.0), A + 210.0, RULES)
    assert spans(w.rebase(RID, rep(6, 10.0), A + 280.0, RULES)) == []
    assert w.add(rep(6, 10.0), A + 280.0, RULES)
    assert spans(w.flush(RID, RULES)) == [(0.0, 1, 2)]


# --- copies and persistence -------------------------------------------------------------


def test_a_copy_is_independent_of_its_original() -> None:
    w = Windows()
    w.add(rep(0, 5.0), A, RULES)
    before = copy.deepcopy(w)
    c = w.copy()
    c.add(rep(1, 6.0), A, RULES)
    c.add(rep(2, 65.0), A, RULES)
    c.close_due(RID, A + 1000.0, RULES)
    assert w == before
    assert [s.count for s in w.flush(RID, RULES)] == [1]


def test_windows_round_trip_through_pickle_and_msgpack() -> None:
    w = Windows()
    for i, at in enumerate([5.0, 64.0, 1.0]):
        w.add(rep(i, at, x=i, errors=("x",) * i), A, RULES)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Windows()), type=Windows) == Windows()
    for restored in (
        pickle.loads(pickle.dumps(w)),
        msgspec.msgpack.decode(msgspec.msgpack.encode(w), type=Windows),
    ):
        assert restored == w
        assert restored.close_at(RULES) == w.close_at(RULES)
        assert restored.copy().flush(RID, RULES) == w.copy().flush(RID, RULES)


# --- properties -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    ts=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    ahead=st.floats(min_value=-1e6, max_value=300.0),
    lateness=st.floats(min_value=0.0, max_value=1e4),
    window_s=st.integers(min_value=1, max_value=3600),
)
# Found by search: here (close_at - offset) + offset rounds below the window's end.
@example(
    ts=T0 + timedelta(seconds=186.871),
    ahead=1704067386.871 - 3274712922.122266,
    lateness=74.179,
    window_s=60,
)
def test_progress_at_close_at_always_closes_a_window(
    ts: datetime, ahead: float, lateness: float, window_s: int
) -> None:
    # Guards against a busy loop: if float rounding left the window open at close_at,
    # the shard's timer would find the same robot due again and again.
    rules = msgspec.structs.replace(RULES, window_s=window_s, allowed_lateness_s=lateness)
    report = msgspec.structs.replace(rep(0, 0.0), ts=ts)
    w = Windows()
    assume(w.add(report, ts.timestamp() - ahead, rules))
    wake = w.close_at(rules)
    assert wake is not None
    assert len(w.close_due(RID, wake, rules)) == 1
    assert w.close_at(rules) is None


@settings(max_examples=300, deadline=None)
@given(
    ts=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    ahead=st.floats(min_value=-1e6, max_value=300.0),
    lateness=st.floats(min_value=0.0, max_value=1e4),
    window_s=st.integers(min_value=1, max_value=3600),
    into=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
# Found by search: offset + close_at rounded below the window's end, so a report arriving
# at the close point counted unless a progress mark had closed the window first.
@example(
    ts=datetime(1970, 7, 12, 0, 59, 55, 1, tzinfo=UTC),
    ahead=-184821.0,
    lateness=1.4699713023410368,
    window_s=1,
    into=0.0,
)
def test_a_report_arriving_at_close_at_is_late_whether_or_not_progress_came_first(
    ts: datetime, ahead: float, lateness: float, window_s: int, into: float
) -> None:
    # The decision must not depend on when the flow read the source's progress: a
    # replay may see its marks at other points than the first run did.
    rules = msgspec.structs.replace(RULES, window_s=window_s, allowed_lateness_s=lateness)
    w = Windows()
    assume(w.add(msgspec.structs.replace(rep(0, 0.0), ts=ts), ts.timestamp() - ahead, rules))
    close_at = w.close_at(rules)
    assert close_at is not None
    start = T0 + timedelta(seconds=min(w.open) - T0_S)
    same_window = start + timedelta(seconds=int(into * window_s))
    later = msgspec.structs.replace(rep(1, 0.0), ts=same_window)
    closed = w.copy()
    assert len(closed.close_due(RID, close_at, rules)) == 1
    assert not closed.add(later, close_at, rules)
    assert not w.copy().add(later, close_at, rules)


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

    def run(seq: list[RobotReport]) -> list[WindowStats]:
        w = Windows()
        for i, r in enumerate(seq):
            assert w.add(r, A + i, PATIENT)
            assert w.close_due(RID, A + i, PATIENT) == []
        return w.flush(RID, PATIENT)

    expected = run(ordered)
    assert run(arrival) == expected
    assert sum(s.count for s in expected) == len(reports)
    assert all(math.isfinite(s.distance_m) for s in expected)


# --- running statistics against the reference: the sorted reports, summed at the close ----


def _reference(reports: list[RobotReport]) -> tuple[int, float, float, float, float, float, int]:
    """What the window must say: each (boot, seq) once (the first to arrive), in order."""
    first: dict[tuple[int, int], RobotReport] = {}
    for r in reports:
        first.setdefault(r.order, r)
    held = [first[k] for k in sorted(first)]
    batteries = [r.battery for r in held]
    return (
        len(held),
        min(batteries),
        math.fsum(batteries) / len(held),
        max(batteries),
        math.fsum(math.hypot(b.pose.x - a.pose.x, b.pose.y - a.pose.y) for a, b in pairwise(held)),
        max(r.speed for r in held),
        sum(len(r.errors) for r in held),
    )


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    orders=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 12)), min_size=1, max_size=30, unique=True
    ),
)
def test_running_statistics_equal_the_sorted_reports_summed_at_the_close(
    data: st.DataObject, orders: list[tuple[int, int]]
) -> None:
    # Any order, gaps, several boots, duplicates with other values (the first one wins):
    # the same count, min, max, and bit for bit the same average and distance.
    coords = st.floats(-1e9, 1e9, allow_nan=False)
    reports = [
        rep(
            seq,
            5.0,
            boot=boot,
            battery=data.draw(st.floats(0.0, 100.0)),
            x=data.draw(coords),
            y=data.draw(coords),
            speed=data.draw(st.floats(0.0, 1000.0)),
            errors=("e",) * data.draw(st.integers(0, 3)),
        )
        for boot, seq in orders
    ]
    again = data.draw(st.lists(st.sampled_from(reports), max_size=10))
    arrival = data.draw(
        st.permutations(reports + [rep(r.seq, 5.0, boot=r.boot, x=7.0) for r in again])
    )
    w = Windows()
    for r in arrival:
        assert w.add(r, 0.0, PATIENT)
    [got] = w.flush(RID, PATIENT)
    want = _reference(arrival)
    assert (
        got.count,
        got.battery_min,
        got.battery_avg,
        got.battery_max,
        got.distance_m,
        got.max_speed,
        got.error_count,
    ) == want
