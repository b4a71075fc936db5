"""Incidents from rules: `for` and clear semantics, and independence from delivery order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.incidents import (
    Compiled,
    Reorder,
    Sample,
    Track,
    evaluate,
    on_sample,
    rule_removed,
)
from fleetpulse.alert_rules import Incident, Rule, RuleBook, load_rules
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


def us(r: RobotReport | datetime) -> int:
    """Event time in µs since the epoch, as the flow holds it."""
    ts = r if isinstance(r, datetime) else r.ts
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


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
    a, b, c = rep(1, 1), rep(2, 2), rep(3, 3)
    assert [buf.add(r, us(r)) for r in (c, a, a, b)] == [True, True, False, True]
    assert buf.next_due_us() == us(a)
    assert [(s.seq, s.ts) for s in buf.release(us(b) + 500_000)] == [(1, a.ts), (2, b.ts)]
    assert not buf.add(a, us(a))  # behind what was released: late
    assert [s.seq for s in buf.release(us(c) + 1)] == [3] and buf.release(10**18) == ()


def test_a_sample_keeps_what_the_rules_read() -> None:
    r = rep(7, 1.5, battery=12.5, speed=0.7, status="error", errors=["E1"], pose=Pose(3, 4, 0))
    sample = Sample.of(r, us(r))
    assert tuple(sample) == (us(r), 0, 7, 12.5, 0.7, "error", ("E1",), 3.0, 4.0)
    assert sample.ts == T0 + timedelta(seconds=1.5)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(
    levels=st.lists(st.sampled_from([5.0, 15.0, 25.0, 35.0]), min_size=1, max_size=30),
    statuses=st.lists(st.sampled_from(["moving", "moving", "error"]), min_size=30, max_size=30),
    gaps=st.lists(st.sampled_from([0.5, 1.0, 4.0, 9.0]), min_size=30, max_size=30),
    order=st.randoms(use_true_random=False),
    dupes=st.lists(st.integers(0, 29), max_size=10),
    cuts=st.lists(st.floats(0, 400), max_size=5),
)
def test_any_delivery_order_and_duplication_gives_the_same_incidents(
    levels: list[float],
    statuses: list[str],
    gaps: list[float],
    order: Any,
    dupes: list[int],
    cuts: list[float],
) -> None:
    """Reports delivered in any order, some twice, held as samples and released by the
    watermark at any points, run by the hot path (clause bits, resting bits): the same
    incidents as each rule's reference semantics on the reports in event-time order."""
    at, reports = 0.0, []
    for i, level in enumerate(levels):
        reports.append(rep(i + 1, at, battery=level, status=statuses[i]))
        at += gaps[i]
    expected = []
    tracks: dict[str, Track | None] = {}
    for r in reports:
        for rule in RULES:
            tracks[rule.name], changed = on_sample(tracks.get(rule.name), rule, r)
            if changed is not None:
                expected.append(changed)

    delivered = reports + [reports[d] for d in dupes if d < len(reports)]
    order.shuffle(delivered)
    buf = Reorder()
    scoped = Compiled(RuleBook(rules=RULES)).scoped("amr-1", None)
    state: dict[str, Track] = {}
    settled = None
    got: list[Incident] = []
    # Everything arrives before the watermark passes it (lateness covers the shuffle);
    # the watermark then moves in steps to the end.
    for r in delivered:
        buf.add(r, us(r))
    for cut in [*sorted(cuts), 1e9]:
        released = buf.release(us(T0) + cut * 1e6)
        found, settled = evaluate(state, scoped, "amr-1", released, 0.0, None, settled)
        got += found
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


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 120), st.integers(0, 2)),
            st.tuples(st.just("release"), st.integers(0, 130), st.just(0)),
        ),
        max_size=300,
    ),
    tail=st.sampled_from([1, 2, 5, 64]),
)
def test_the_reorder_buffer_is_a_sorted_set_released_by_the_watermark(
    steps: list[tuple[str, int, int]], tail: int
) -> None:
    """Against a plain sorted set: holding keeps each (ts, boot, seq) once, in order,
    whatever the arrival order and however the samples split between pending and tail;
    a release hands out exactly those at or before the watermark, later ones stay; a
    key at or before the last released is refused."""
    buf = Reorder()
    Reorder.TAIL = tail
    try:
        held: set[tuple[int, int, int]] = set()
        done = (-(2**62), -1, -1)
        for op, a, b in steps:
            if op == "add":
                r = rep(a, a * 0.5, boot=b)
                key = (us(r), b, a)
                assert buf.add(r, us(r)) == (key > done and key not in held)
                if key > done:
                    held.add(key)
            else:
                cut = us(T0) + a * 500_000
                out = [s[:3] for s in buf.release(cut)]
                expected = sorted(k for k in held if k[0] <= cut)
                assert out == expected
                held -= set(expected)
                if expected:
                    done = expected[-1]
            keys = [s[:3] for s in (*buf.pending, *buf.tail)]
            assert keys == sorted(held)
            assert len(buf.tail) <= tail
    finally:
        Reorder.TAIL = 64
