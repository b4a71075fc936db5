"""Incidents from rules: `for` and clear semantics, and independence from delivery order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.incidents import Compiled, Reorder, Track, on_sample, rule_removed
from fleetpulse.alert_rules import Incident, Rule, load_rules
from fleetpulse.schema import Pose, RobotReport

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RULES = load_rules(
    """
rules:
  - name: low
    when: {battery: {below: 20}}
    for_s: 10
    severity: critical
    clear: {battery: {above: 30}}
  - name: now
    when: {status: {in: [error, estop]}}
"""
).rules
LOW, NOW = RULES


def rep(seq: int, at: float, **over: Any) -> RobotReport:
    body: dict[str, Any] = {
        "robot_id": "amr-1",
        "seq": seq,
        "ts": T0 + timedelta(seconds=at),
        "status": "moving",
        "battery": 50.0,
        "pose": Pose(0.0, 0.0, 0.0),
        **over,
    }
    return RobotReport(**body)


def run(rule: Rule, reports: list[RobotReport]) -> list[Incident]:
    track: Track | None = None
    out = []
    for r in reports:
        track, changed = on_sample(track, rule, r)
        if changed is not None:
            out.append(changed)
    return out


def test_a_condition_must_hold_for_the_whole_for_duration() -> None:
    held = [rep(1, 0, battery=15), rep(2, 5, battery=12), rep(3, 9.9, battery=11)]
    assert run(LOW, held) == []  # 9.9 s < 10 s
    [opened] = run(LOW, [*held, rep(4, 10, battery=10)])
    assert (opened.id, opened.state, opened.severity) == ("amr-1:low:0:4", "open", "critical")
    assert (opened.since, opened.opened_at, opened.opened_by) == (
        T0,
        T0 + timedelta(seconds=10),
        (0, 4),
    )
    # A break in the run starts it again.
    broken = [rep(1, 0, battery=15), rep(2, 5, battery=25), rep(3, 12, battery=15)]
    assert run(LOW, [*broken, rep(4, 21, battery=15)]) == []
    assert [i.since for i in run(LOW, [*broken, rep(4, 22, battery=15)])] == [
        T0 + timedelta(seconds=12)
    ]


def test_the_clear_condition_closes_it_with_hysteresis_and_a_new_run_opens_a_new_one() -> None:
    reports = [
        rep(1, 0, battery=15),
        rep(2, 10, battery=15),  # opens
        rep(3, 20, battery=25),  # between: still open
        rep(4, 30, battery=31),  # closes
        rep(5, 40, battery=10),
        rep(6, 50, battery=10),  # opens again
    ]
    opened, closed, again = run(LOW, reports)
    assert (closed.id, closed.state, closed.reason) == (opened.id, "closed", "cleared")
    assert (closed.closed_at, closed.closed_by) == (T0 + timedelta(seconds=30), (0, 4))
    assert (again.id, again.state) == ("amr-1:low:0:6", "open")


def test_for_zero_opens_at_once_and_the_default_clear_is_when_no_longer_holding() -> None:
    opened, closed = run(NOW, [rep(1, 0, status="estop"), rep(2, 1, status="error"), rep(3, 2)])
    assert (opened.opened_by, closed.closed_by) == ((0, 1), (0, 3))


def test_a_removed_rule_closes_its_open_incident() -> None:
    track, opened = on_sample(None, NOW, rep(1, 0, status="estop"))
    assert opened is not None
    closed = rule_removed(track, T0 + timedelta(seconds=5))
    assert closed is not None and (closed.state, closed.reason) == ("closed", "rule removed")
    assert rule_removed(Track(), T0) is None


def test_reorder_releases_in_event_time_order_once_each() -> None:
    buf = Reorder()
    us = lambda r: int((r.ts - T0).total_seconds() * 1e6)  # noqa: E731
    a, b, c = rep(1, 1), rep(2, 2), rep(3, 3)
    assert [buf.add(r, us(r)) for r in (c, a, a, b)] == [True, True, False, True]
    assert buf.next_due_us() == 1_000_000
    assert buf.release(2_500_000) == [a, b]
    assert not buf.add(a, us(a))  # behind what was released: late
    assert buf.release(10_000_000) == [c] and buf.release(10**12) == []


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(
    levels=st.lists(st.sampled_from([5.0, 15.0, 25.0, 35.0]), min_size=1, max_size=30),
    gaps=st.lists(st.sampled_from([0.5, 1.0, 4.0, 9.0]), min_size=30, max_size=30),
    order=st.randoms(use_true_random=False),
    dupes=st.lists(st.integers(0, 29), max_size=10),
    cuts=st.lists(st.floats(0, 400), max_size=5),
)
def test_any_delivery_order_and_duplication_gives_the_same_incidents(
    levels: list[float], gaps: list[float], order: Any, dupes: list[int], cuts: list[float]
) -> None:
    """Reports delivered in any order, some twice, released by the watermark at any
    points: the same incidents as the reports in event-time order, each once."""
    at, reports = 0.0, []
    for i, level in enumerate(levels):
        reports.append(rep(i + 1, at, battery=level))
        at += gaps[i]
    expected = run(LOW, reports)

    delivered = reports + [reports[d] for d in dupes if d < len(reports)]
    order.shuffle(delivered)
    buf = Reorder()
    track: Track | None = None
    got: list[Incident] = []
    # Everything arrives before the watermark passes it (lateness covers the shuffle);
    # the watermark then moves in steps to the end.
    for r in delivered:
        buf.add(r, int((r.ts - T0).total_seconds() * 1e6))
    for cut in [*sorted(cuts), 1e9]:
        for r in buf.release(cut * 1e6):
            track, changed = on_sample(track, LOW, r)
            if changed is not None:
                got.append(changed)
    assert got == expected


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(
    robot=st.sampled_from(["amr-1", "amr-17", "amr-170", "dock-2", "x"]),
    site=st.sampled_from([None, "north", "south", "yard"]),
)
def test_each_robots_rules_are_the_ones_whose_scope_holds_it(robot: str, site: str | None) -> None:
    """Compiled.scoped (indexed by site, id and pattern) agrees with Scope's own matcher."""
    book = load_rules(
        """
rules:
  - {name: all, when: {battery: {below: 5}}}
  - {name: north, scope: {sites: [north, yard]}, when: {battery: {below: 5}}}
  - {name: some, scope: {robots: [amr-1, x]}, when: {battery: {below: 5}}}
  - {name: amrs, scope: {pattern: "amr-1[0-9]*"}, when: {battery: {below: 5}}}
  - {name: mixed, scope: {sites: [south], pattern: "dock-.*"}, when: {silence_s: {above: 9}}}
"""
    )
    scoped = Compiled(book).scoped(robot, site)
    expected = [r.name for r in book.rules if r.scope.matcher()(robot, site)]
    assert [r.name for r in scoped.rules] == expected
    assert [r.name for r, _, _ in scoped.reports] == [n for n in expected if n != "mixed"]
    assert scoped.names == frozenset(expected)
