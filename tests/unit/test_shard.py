"""A shard of robots: decoding, arrival-clock timers, snapshots and contained failures.

``ShardLogic`` is driven directly (``on_batch``/``snapshot``), without a Bytewax runtime.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import dataflows.shard
from dataflows.incidents import Reorder
from dataflows.records import Control, DeadLetter, Out, Raw, Republish, Retired
from dataflows.robot import (
    HOLD_GRACE_S,
    RobotState,
    on_control,
    on_progress,
    on_report,
    rules_due,
)
from dataflows.rules import LiveRules, Rules
from dataflows.shard import (
    SHARD_FORMAT,
    Item,
    ShardLogic,
    ShardState,
    Timers,
    shard_key,
    shard_keys,
)
from dataflows.spans import FlowSpans
from fleetpulse.alert_rules import RuleBook, load_rules
from fleetpulse.schema import ROBOT_ID_PATTERN, STATUSES, RobotReport

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T0_S = 1_704_067_200
T0_MS = T0_S * 1000
A = float(T0_S)  # the arrival clock (s) where the pure logic is called directly
# The last millisecond a datetime can hold: arrival times range from 0 up to it.
MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC) - T0) // timedelta(
    milliseconds=1
) + T0_MS
RULES = Rules(
    offline_after_s=30.0,
    low_battery_pct=20.0,
    battery_ok_pct=25.0,
    window_s=60,
    allowed_lateness_s=10.0,
    max_future_s=300.0,
    max_age_s=604_800.0,
)
BINDING = "binding-x"
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # sampled


def body(robot: str, seq: int, *, at: float = 0.0, **change: Any) -> dict[str, Any]:
    """A report as JSON would carry it; event time ``at`` seconds after T0."""
    return {
        "robot_id": robot,
        "seq": seq,
        "ts": (T0 + timedelta(seconds=at)).isoformat(),
        "status": "idle",
        "battery": 80.0,
        "pose": {"x": 0.0, "y": 0.0, "theta": 0.0},
        **change,
    }


def raw(
    robot: str,
    seq: int,
    arrival_ms: int,
    *,
    at: float | None = None,
    partition: int = 0,
    offset: int = 0,
    traceparent: str = "",
    **change: Any,
) -> Raw:
    """A Kafka message of one report; event time defaults to its arrival."""
    event = (arrival_ms - T0_MS) / 1000 if at is None else at
    value = msgspec.json.encode(body(robot, seq, at=event, **change))
    return (robot, value, traceparent, partition, offset, arrival_ms)


def shard(
    resume: bytes | None = None,
    *,
    binding: str = BINDING,
    rules: Rules = RULES,
    spans: FlowSpans | None = None,
) -> ShardLogic:
    return ShardLogic(rules, spans, binding, resume)


def step(logic: ShardLogic, *items: Item) -> Out:
    """One on_batch call; an empty Out when it produced nothing."""
    outs, retain = logic.on_batch(list(items))
    assert retain == ShardLogic.RETAIN
    assert len(outs) <= 1
    return outs[0] if outs else Out()


def alerts(out: Out) -> list[tuple[str, str]]:
    return [(a.kind, a.id) for a in out.alerts]


# --- keys ---------------------------------------------------------------------------------


def test_shard_keys_are_stable_and_cover_every_shard() -> None:
    assert shard_keys(3) == ["s0", "s1", "s2"]
    keys = {shard_key(f"amr-{i}", 8) for i in range(200)}
    assert keys == set(shard_keys(8))
    # crc32, not hash(): the same in every process and every run.
    assert shard_key("amr-1", 64) == "s21"
    assert shard_key("amr-1", 1) == "s0"


# --- timers -------------------------------------------------------------------------------

PATIENT = msgspec.structs.replace(RULES, allowed_lateness_s=1e6)  # windows close much later
QUIET = msgspec.structs.replace(RULES, offline_after_s=1e6)  # nobody goes offline


def state_of(
    robot: str, arrival: float, *, partition: int = 0, at: float = 0.0, rules: Rules = RULES
) -> RobotState:
    """The state of a robot whose one report (event time ``at`` after T0) arrived then."""
    report = msgspec.convert(body(robot, 1, at=at), RobotReport)
    state, _ = on_report(None, report, arrival, partition, rules)
    return state


def test_timers_find_offline_robots_in_the_order_their_last_report_arrived() -> None:
    timers = Timers()
    robots = {name: state_of(name, A + i, rules=PATIENT) for i, name in enumerate("abc")}
    robots["d"] = state_of("d", A, partition=1, rules=PATIENT)
    for name, st_ in robots.items():
        timers.track(name, st_, PATIENT)
    assert timers.due(0, A + 30.5, robots, PATIENT) == ["a"]
    assert timers.due(0, A + 30.5, robots, PATIENT) == []  # nothing is due twice
    # A newer report moves b to the back: c is due first now.
    robots["b"] = state_of("b", A + 10, rules=PATIENT)
    timers.track("b", robots["b"], PATIENT)
    # Tracking an unchanged state moves nothing.
    timers.track("c", robots["c"], PATIENT)
    assert timers.due(0, A + 32.5, robots, PATIENT) == ["c"]
    assert timers.due(0, A + 40.0, robots, PATIENT) == ["b"]
    # Partitions keep their own clocks: d is due only by partition 1's progress.
    assert timers.due(0, A + 1000.0, robots, PATIENT) == []
    assert timers.due(1, A + 30.0, robots, PATIENT) == ["d"]


def test_timers_forget_robots_that_went_offline() -> None:
    timers = Timers()
    robots = {"a": state_of("a", A, rules=PATIENT)}
    timers.track("a", robots["a"], PATIENT)
    offline = msgspec.structs.replace(robots["a"].live, online=False)
    robots["a"] = msgspec.structs.replace(robots["a"], live=offline)
    timers.track("a", robots["a"], PATIENT)
    assert timers.due(0, A + 1e5, robots, PATIENT) == []


def test_timers_bucket_window_closes_by_the_whole_second_at_or_after_them() -> None:
    timers = Timers()
    # A report 30 s into its minute closes it 40 s after its arrival (lateness 10 s).
    robots = {
        "x": state_of("x", A + 0.25, at=30.0, rules=QUIET),  # closes at A + 40.25
        "y": state_of("y", A + 0.75, at=30.0, rules=QUIET),  # A + 40.75
        "z": state_of("z", A + 5.0, at=30.0, rules=QUIET),  # A + 45
        "w": state_of("w", A, at=30.0, partition=1, rules=QUIET),  # A + 40, partition 1
    }
    assert robots["x"].windows.close_at(QUIET) == A + 40.25
    for name, st_ in robots.items():
        timers.track(name, st_, QUIET)
    assert timers.due(0, A + 40.5, robots, QUIET) == []  # x's second is not over
    assert sorted(timers.due(0, A + 41.0, robots, QUIET)) == ["x", "y"]
    assert timers.due(0, A + 44.999, robots, QUIET) == []
    assert timers.due(0, A + 45.0, robots, QUIET) == ["z"]  # exactly at a whole second
    assert timers.due(0, A + 1e5, robots, QUIET) == []
    assert timers.due(1, A + 40.0, robots, QUIET) == ["w"]


def test_timers_move_a_robot_to_the_bucket_of_its_new_close() -> None:
    timers = Timers()
    robots = {"x": state_of("x", A, at=30.0, rules=QUIET)}  # closes at A + 40
    timers.track("x", robots["x"], QUIET)
    report = msgspec.convert(body("x", 2, at=90.0), RobotReport)
    robots["x"], _ = on_report(robots["x"], report, A + 5, 0, QUIET)  # [0, 60) closed now
    timers.track("x", robots["x"], QUIET)
    assert robots["x"].windows.close_at(QUIET) == A + 45.0
    assert timers.due(0, A + 40.0, robots, QUIET) == []  # its old bucket is empty
    assert timers.due(0, A + 44.999, robots, QUIET) == []
    assert timers.due(0, A + 45.0, robots, QUIET) == ["x"]


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 20_000),  # arrival clock advance, ms
            st.integers(0, 7),  # robot
            st.floats(-20.0, 80.0),  # event time relative to arrival
            st.integers(0, 1),  # partition of a progress mark
            st.booleans(),  # a progress mark instead of a report
        ),
        max_size=60,
    )
)
def test_timers_hand_out_exactly_the_robots_that_are_due(
    steps: list[tuple[int, int, float, int, bool]],
) -> None:
    # Model check against the robots' own deadlines, as ShardLogic uses the timers.
    timers = Timers()
    robots: dict[str, RobotState] = {}
    now = A
    for advance, i, ahead, partition, mark in steps:
        now += advance / 1000
        if not mark:
            name = f"r{i}"
            report = msgspec.convert(body(name, int(now * 10), at=now - A + ahead), RobotReport)
            robots[name], _ = on_report(robots.get(name), report, now, i % 2, RULES)
            timers.track(name, robots[name], RULES)
            continue
        due = timers.due(partition, now, robots, RULES)
        assert len(due) == len(set(due))
        for name in due:
            st_ = robots[name]
            assert st_.partition == partition
            close = st_.windows.close_at(RULES)
            deadline = st_.live.last_seen + 30.0 if st_.live.online else None
            assert (deadline is not None and deadline <= now) or (
                close is not None and close <= now
            )
            robots[name], _ = on_progress(st_, now, RULES)
            timers.track(name, robots[name], RULES)
        # Nothing of this partition is left behind: no deadline or whole-second close passed.
        for st_ in robots.values():
            if st_.partition != partition:
                continue
            assert not (st_.live.online and st_.live.last_seen + 30.0 <= now)
            close = st_.windows.close_at(RULES)
            assert close is None or close > int(now)


# --- the shard: reports, marks, controls ----------------------------------------------------


def test_reports_become_live_states_alerts_and_counts() -> None:
    logic = shard()
    out = step(logic, raw("amr-1", 1, T0_MS, battery=10.0, partition=2, offset=7))
    [live] = out.states
    assert (live.report.seq, live.last_seen, live.online) == (1, T0_S, True)
    assert alerts(out) == [("low_battery", "amr-1:low_battery:0:0:1")]
    assert (out.applied, out.stale, out.duplicate, out.dead) == (1, 0, 0, [])
    assert out.appended_ms == {"amr-1": T0_MS}
    assert logic.robots["amr-1"].partition == 2

    out = step(
        logic, raw("amr-1", 1, T0_MS + 5, partition=2), raw("amr-1", 0, T0_MS + 6, partition=2)
    )
    assert (out.applied, out.stale, out.duplicate, out.states, out.appended_ms) == (0, 1, 1, [], {})
    assert logic.robots["amr-1"].live.last_seen == (T0_MS + 6) / 1000


def test_a_republish_emits_every_robots_live_state_once_per_token() -> None:
    logic = shard()
    step(logic, raw("amr-1", 1, T0_MS), raw("amr-2", 4, T0_MS + 1), raw("amr-1", 2, T0_MS + 2))
    out = step(logic, Republish("t1"))
    assert out.republished == "t1"
    assert sorted((st.report.robot_id, st.report.seq) for st in out.states) == [
        ("amr-1", 2),
        ("amr-2", 4),
    ]
    assert out.states == [logic.robots[r].live for r in ("amr-1", "amr-2")]
    assert (out.applied, out.stale, out.duplicate, out.alerts) == (0, 0, 0, [])
    # Every source partition passes the same token on: the shard answers it once.
    assert step(logic, Republish("t1")) == Out()
    again = step(logic, raw("amr-1", 3, T0_MS + 3), Republish("t2"))
    # In order: the new report applied, then every robot as it is now (amr-1 at seq 3).
    assert [(st.report.robot_id, st.report.seq) for st in again.states] == [
        ("amr-1", 3),
        ("amr-1", 3),
        ("amr-2", 4),
    ]
    assert again.republished == "t2" and again.applied == 1


def test_an_empty_shard_answers_a_republish_too() -> None:
    """The sink counts answering shards to know a re-publish is complete."""
    out = step(shard(), Republish("t1"))
    assert bool(out) and out.republished == "t1" and out.states == []


def test_messages_that_are_no_report_become_dead_letters_and_change_nothing() -> None:
    logic = shard()
    passed = DeadLetter(b"bad key", b"v", "key", "message key is not a robot id", 3, 9)
    bad_json = ("amr-1", b"{", "", 1, 2, T0_MS)
    other_key = ("amr-2", raw("amr-1", 1, T0_MS)[1], "", 0, 0, T0_MS)
    out = step(logic, passed, bad_json, other_key, raw("amr-1", 1, T0_MS - 301_000, at=0.0))
    assert [(d.kind, d.key, d.offset) for d in out.dead] == [
        ("key", b"bad key", 9),
        ("invalid", b"amr-1", 2),
        ("key", b"amr-2", 0),
        ("future", b"amr-1", 0),
    ]
    assert out.dead[0] is passed
    assert (out.states, out.applied, logic.robots) == ([], 0, {})


def test_a_control_for_a_robot_that_never_reported_is_ignored() -> None:
    logic = shard()
    outs, _ = logic.on_batch([Control("amr-1", "reset_order", "op", 0, 1, T0_MS)])
    assert (outs, logic.robots) == ([], {})


def test_a_reset_order_control_applies_the_next_report(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetpulse.dataflow")
    logic = shard()
    step(logic, raw("amr-1", 50, T0_MS))
    out = step(logic, Control("amr-1", "reset_order", "op-7", 0, 3, T0_MS + 1000))
    assert alerts(out) == [("order_reset", "amr-1:order_reset:1")]
    assert [s.reset_pending for s in out.states] == [True]
    assert "ordering of robot amr-1 reset (by op-7, offset 3)" in caplog.text
    out = step(logic, raw("amr-1", 2, T0_MS + 2000))
    assert (out.applied, out.states[0].report.seq, out.states[0].resets) == (1, 2, 1)


# --- retirement and the robot limit --------------------------------------------------------

RETIRING = msgspec.structs.replace(RULES, retire_after_s=120.0)


def test_a_retire_control_forgets_the_robot_and_says_what_came_before() -> None:
    logic = shard()
    step(logic, raw("amr-2", 1, T0_MS))
    out = step(
        logic,
        raw("amr-1", 1, T0_MS + 1, battery=10.0),  # a state and a low_battery alert
        Control("amr-1", "retire", "op-7", 0, 5, T0_MS + 2),
        raw("amr-1", 2, T0_MS + 3),  # its next life: a new robot
    )
    [retired] = out.retired
    assert retired == Retired("amr-1", T0_MS + 2, "admin", "op-7", 1, 1, 0, 0)
    assert [(st.report.robot_id, st.report.seq) for st in out.states] == [
        ("amr-1", 1),
        ("amr-1", 2),
    ]
    # Its second life starts over: a first report, online, no resets carried over.
    assert logic.robots["amr-1"].live.report.seq == 2 and logic.robots["amr-1"].applied == 1
    step(logic, Control("amr-1", "retire", "op-7", 0, 6, T0_MS + 4))
    assert sorted(logic.robots) == ["amr-2"]
    # Gone from the snapshot and from the timers: no offline alert for it later.
    assert sorted(msgspec.msgpack.decode(logic.snapshot(), type=ShardState).robots) == ["amr-2"]
    later = step(logic, (0, T0_MS + 60_000))
    assert [a.robot_id for a in later.alerts] == ["amr-2"]


def test_a_retire_control_for_an_unknown_robot_still_clears_redis() -> None:
    out = step(shard(), Control("ghost", "retire", "op", 0, 1, T0_MS))
    assert [(r.robot_id, r.why) for r in out.retired] == [("ghost", "admin")]


def test_robots_silent_longer_than_retire_after_are_retired_at_the_progress_mark() -> None:
    logic = shard(rules=RETIRING)
    step(logic, raw("amr-1", 1, T0_MS), raw("amr-2", 1, T0_MS + 10_000))
    step(logic, raw("amr-3", 1, T0_MS + 5_000, partition=1))
    out = step(logic, (0, T0_MS + 119_999))
    assert out.retired == [] and sorted(logic.robots) == ["amr-1", "amr-2", "amr-3"]
    # A stale report shows the robot is alive: amr-2's silence starts again.
    step(logic, raw("amr-2", 0, T0_MS + 100_000))
    out = step(logic, (0, T0_MS + 130_000))
    assert [(r.robot_id, r.at_ms, r.why, r.by) for r in out.retired] == [
        ("amr-1", T0_MS + 130_000, "retention", "")
    ]
    # Only the partition whose clock moved: amr-3 (partition 1) waits for its own.
    assert sorted(logic.robots) == ["amr-2", "amr-3"]
    out = step(logic, (1, T0_MS + 200_000))
    assert [r.robot_id for r in out.retired] == ["amr-3"]
    out = step(logic, (0, T0_MS + 220_000))
    assert [r.robot_id for r in out.retired] == ["amr-2"] and logic.robots == {}


def test_retirement_after_a_restore_follows_the_arrival_order() -> None:
    logic = shard(rules=RETIRING)
    step(logic, raw("amr-2", 1, T0_MS + 50_000), raw("amr-1", 1, T0_MS))
    restored = shard(logic.snapshot(), rules=RETIRING)
    out = step(restored, (0, T0_MS + 125_000))
    assert [r.robot_id for r in out.retired] == ["amr-1"]


def test_no_retirement_when_retire_after_is_zero() -> None:
    logic = shard()
    step(logic, raw("amr-1", 1, T0_MS))
    assert step(logic, (0, T0_MS + 10**10)).retired == []
    assert list(logic.robots) == ["amr-1"]


def test_a_new_robot_beyond_the_shards_share_is_a_dead_letter() -> None:
    logic = shard(rules=msgspec.structs.replace(RULES, max_robots_per_shard=2))
    out = step(logic, raw("amr-1", 1, T0_MS), raw("amr-2", 1, T0_MS + 1))
    assert out.applied == 2
    out = step(logic, raw("amr-3", 1, T0_MS + 2, offset=9), raw("amr-1", 2, T0_MS + 3))
    [dead] = out.dead
    assert (dead.kind, dead.key, dead.offset) == ("limit", b"amr-3", 9)
    assert "FLEETPULSE_MAX_ROBOTS" in dead.reason and out.applied == 1
    assert sorted(logic.robots) == ["amr-1", "amr-2"]
    # A retirement makes room.
    out = step(
        logic, Control("amr-2", "retire", "op", 0, 10, T0_MS + 4), raw("amr-3", 1, T0_MS + 5)
    )
    assert out.dead == [] and sorted(logic.robots) == ["amr-1", "amr-3"]


# --- alert rules ----------------------------------------------------------------------------

BOOK = load_rules(
    """
rules:
  - name: low
    when: {battery: {below: 20}}
    for_s: 10
    severity: critical
    clear: {battery: {above: 30}}
  - name: north-estop
    scope: {sites: [north]}
    when: {status: {in: [estop]}}
"""
)
WITH_RULES = msgspec.structs.replace(RULES, book=BOOK)
DOMAIN_BOOK = msgspec.structs.replace(
    BOOK,
    rules=[
        *BOOK.rules,
        *load_rules(
            """
rules:
  - {name: quiet, when: {silence_s: {above: 20}}, for_s: 5}
  - {name: parked, when: {distance_m: {below: 1}}, for_s: 60}
"""
        ).rules,
    ],
)


def incidents_of(outs: Iterable[Out]) -> list[tuple[str, str, str]]:
    return [(i.id, i.state, i.reason) for out in outs for i in out.incidents]


def test_a_rule_held_for_its_duration_opens_an_incident_once_the_watermark_passes() -> None:
    logic = shard(rules=WITH_RULES)  # lateness 10 s: a report is judged 10 s after its ts
    outs = [step(logic, raw("amr-1", s, T0_MS + s * 1000, battery=15.0)) for s in range(11)]
    assert incidents_of(outs) == []  # the report at 10 s waits for the watermark
    out = step(logic, raw("amr-1", 11, T0_MS + 20_000, battery=15.0))
    [opened] = out.incidents
    assert (opened.id, opened.rule, opened.severity, opened.state) == (
        "amr-1:low:0:10",
        "low",
        "critical",
        "open",
    )
    assert (opened.since, opened.opened_at) == (T0, T0 + timedelta(seconds=10))
    # The arrival clock alone (a progress mark) releases held reports too.
    step(logic, raw("amr-1", 12, T0_MS + 21_000, battery=35.0))
    out = step(logic, (0, T0_MS + 31_000))
    assert incidents_of([out]) == [("amr-1:low:0:10", "closed", "cleared")]
    assert logic.robots["amr-1"].tracks == {}


def test_held_reports_go_with_the_next_report_and_wake_a_robot_only_once_it_is_quiet() -> None:
    # A robot reporting once a second: each report releases what its watermark (10 s
    # behind) passed, so the timer for the oldest held report is set HOLD_GRACE_S past
    # its due time, after the next report; a progress visit for each held report would
    # double the steps of every robot.
    logic = shard(rules=WITH_RULES)
    for s in range(15):
        step(logic, raw("amr-1", s, T0_MS + s * 1000, battery=15.0))
        held = logic.robots["amr-1"].held
        assert held is not None
        oldest = max(0, s - 9)  # ts at or before s - 10 went with this report
        assert held.next_due_us() == (T0_S + oldest) * 1_000_000
        due = rules_due(logic.robots["amr-1"], logic.rules)
        assert due == T0_S + oldest + 10.0 + HOLD_GRACE_S
        assert due > T0_S + s + 1  # the next report comes first
        assert logic.timers.due(0, T0_S + s + 1, logic.robots, logic.rules) == []
    # Gone quiet: no visit before the grace has passed, then every held report goes.
    step(logic, (0, int((T0_S + 5 + 10 + HOLD_GRACE_S) * 1000) - 1))
    now_held = logic.robots["amr-1"].held
    assert now_held is not None and now_held.next_due_us() == (T0_S + 5) * 1_000_000  # none went
    [opened] = step(logic, (0, int((T0_S + 14 + 10 + HOLD_GRACE_S) * 1000))).incidents
    assert (opened.id, opened.opened_at) == ("amr-1:low:0:10", T0 + timedelta(seconds=10))
    assert logic.robots["amr-1"].held == Reorder(done=(T0_MS * 1000 + 14_000_000, 0, 14))


def test_incidents_do_not_depend_on_delivery_order_duplicates_or_a_restore() -> None:
    levels = [25.0, 15.0, 15.0, 15.0, 15.0, 35.0, 10.0, 10.0, 10.0, 10.0, 40.0]
    reports = [
        raw("amr-1", s, T0_MS + s * 4000, at=s * 4.0, battery=b) for s, b in enumerate(levels)
    ]
    in_order = shard(rules=WITH_RULES)
    expected = incidents_of([step(in_order, *reports), step(in_order, (0, MAX_MS))])
    assert [state for _, state, _ in expected] == ["open", "closed", "open", "closed"]
    # Shuffled within the lateness (arrival order differs from event order), some twice,
    # and restored from a snapshot half way.
    shuffled = [reports[i] for i in (1, 0, 3, 2, 2, 5, 4, 6, 8, 7, 7, 10, 9)]
    arrivals = [T0_MS + i * 3000 for i in range(len(shuffled))]
    delivered = [(*r[:5], ms) for r, ms in zip(shuffled, arrivals, strict=True)]
    first = shard(rules=WITH_RULES)
    outs = [step(first, *delivered[:6])]
    second = shard(first.snapshot(), rules=WITH_RULES)
    outs += [step(second, *delivered[6:]), step(second, (0, MAX_MS))]
    assert incidents_of(outs) == expected


def test_a_silence_rule_opens_on_the_arrival_clock_and_the_next_report_closes_it() -> None:
    book = load_rules("rules: [{name: quiet, when: {silence_s: {above: 20}}, for_s: 5}]")
    logic = shard(rules=msgspec.structs.replace(RULES, book=book, offline_after_s=600.0))
    step(logic, raw("amr-1", 1, T0_MS), raw("amr-1", 2, T0_MS + 1000))
    assert step(logic, (0, T0_MS + 25_999)).incidents == []  # 1 s + 20 s + 5 s not yet
    [opened] = step(logic, (0, T0_MS + 26_000)).incidents
    assert (opened.id, opened.state, opened.opened_by) == ("amr-1:quiet:0:2", "open", (0, 2))
    assert opened.since == T0 + timedelta(seconds=21)
    assert step(logic, (0, T0_MS + 90_000)).incidents == []  # once per silence
    [closed] = step(logic, raw("amr-1", 3, T0_MS + 91_000)).incidents
    assert (closed.id, closed.state, closed.closed_by) == ("amr-1:quiet:0:2", "closed", (0, 3))
    # A silence the progress marks never showed (the report came first): opened and
    # closed by the report, as offline and back_online are.
    out = step(logic, raw("amr-1", 4, T0_MS + 200_000))
    assert [(i.id, i.state) for i in out.incidents] == [
        ("amr-1:quiet:0:3", "open"),
        ("amr-1:quiet:0:3", "closed"),
    ]


def test_a_distance_rule_reads_the_last_closed_window_before_each_report() -> None:
    book = load_rules("rules: [{name: parked, when: {distance_m: {below: 1}}}]")
    rules = msgspec.structs.replace(RULES, book=book, allowed_lateness_s=0.0)
    logic = shard(rules=rules)
    # Minute 0: moving 10 m; minute 1: standing still.
    step(logic, raw("amr-1", 1, T0_MS, pose={"x": 0.0, "y": 0.0, "theta": 0.0}))
    step(logic, raw("amr-1", 2, T0_MS + 30_000, pose={"x": 10.0, "y": 0.0, "theta": 0.0}))
    out = step(logic, raw("amr-1", 3, T0_MS + 60_000, pose={"x": 10.0, "y": 0.0, "theta": 0.0}))
    assert [w.distance_m for w in out.windows] == [10.0] and out.incidents == []
    step(logic, raw("amr-1", 4, T0_MS + 90_000, pose={"x": 10.0, "y": 0.0, "theta": 0.0}))
    out = step(logic, raw("amr-1", 5, T0_MS + 120_000, pose={"x": 10.0, "y": 0.0, "theta": 0.0}))
    assert [w.distance_m for w in out.windows] == [0.0]
    assert [(i.id, i.state) for i in out.incidents] == [("amr-1:parked:0:5", "open")]


def test_an_edited_or_removed_rule_applies_from_the_next_batch() -> None:
    live = LiveRules(WITH_RULES)
    logic = shard(rules=msgspec.structs.replace(WITH_RULES, allowed_lateness_s=0.0))
    logic = ShardLogic(live, None, BINDING, None)
    live.current = msgspec.structs.replace(WITH_RULES, allowed_lateness_s=0.0)
    out = step(logic, raw("amr-1", 1, T0_MS, site="north", status="estop"))
    assert incidents_of([out]) == [("amr-1:north-estop:0:1", "open", "")]
    # The rule is removed from the book: its open incident closes at the next evaluation.
    book = load_rules("rules: [{name: low, when: {battery: {below: 20}}, for_s: 10}]")
    live.current = msgspec.structs.replace(live.current, book=book)
    out = step(logic, raw("amr-1", 2, T0_MS + 1000, site="north", status="estop"))
    assert incidents_of([out]) == [("amr-1:north-estop:0:1", "closed", "rule removed")]
    # Edited (a shorter for_s): from the next report on, with no second incident.
    book = load_rules("rules: [{name: low, when: {battery: {below: 20}}, for_s: 1}]")
    step(logic, raw("amr-1", 3, T0_MS + 2000, battery=10.0))
    live.current = msgspec.structs.replace(live.current, book=book)
    out = step(logic, raw("amr-1", 4, T0_MS + 3000, battery=10.0))
    out2 = step(logic, raw("amr-1", 5, T0_MS + 4000, battery=10.0))
    assert incidents_of([out, out2]) == [("amr-1:low:0:4", "open", "")]


def test_a_late_report_is_a_dead_letter_and_still_applied() -> None:
    logic = shard()
    step(logic, raw("amr-1", 1, T0_MS, at=5.0))
    out = step(logic, raw("amr-1", 2, T0_MS + 65_000, at=59.0, partition=0, offset=8))
    [late] = out.dead
    assert (late.kind, late.key, late.offset) == ("late", b"amr-1", 8)
    assert late.value == raw("amr-1", 2, T0_MS + 65_000, at=59.0)[1]
    assert "behind the closed window" in late.reason
    assert (out.applied, [w.count for w in out.windows]) == (1, [1])


def test_progress_marks_run_offline_on_the_robots_partition_only() -> None:
    logic = shard()
    step(logic, raw("amr-1", 1, T0_MS, partition=2))  # its window closes at T0 + 70 s
    assert step(logic, (1, T0_MS + 60_000)) == Out()
    assert step(logic, (2, T0_MS + 29_999)) == Out()
    out = step(logic, (2, T0_MS + 30_000))
    assert alerts(out) == [("offline", f"amr-1:offline:{T0_MS + 30_000}")]
    assert [s.online for s in out.states] == [False]
    # A mark that is not newer than the partition's last one is ignored.
    assert step(logic, (2, T0_MS + 30_000), (2, T0_MS + 1)) == Out()
    out = step(logic, raw("amr-1", 2, T0_MS + 40_000, partition=2))
    assert [a.kind for a in out.alerts] == ["back_online"]


def test_progress_closes_windows_at_close_at_rounded_up_to_the_second() -> None:
    logic = shard(rules=QUIET)
    # Event time 30 s into the minute: its window closes 40 s after it arrived.
    step(logic, raw("a", 1, T0_MS, at=30.0), raw("b", 1, T0_MS + 250, at=30.0))
    assert step(logic, (0, T0_MS + 39_999)) == Out()
    out = step(logic, (0, T0_MS + 40_000))  # a: exactly at its close_at
    assert [(w.robot_id, w.count) for w in out.windows] == [("a", 1)]
    # b closes at 40.25 s; the shard looks again at the next whole second.
    assert step(logic, (0, T0_MS + 40_500)) == Out()
    out = step(logic, (0, T0_MS + 41_000))
    assert [(w.robot_id, w.window_start) for w in out.windows] == [("b", T0)]


# --- hot reload ---------------------------------------------------------------------------


def test_new_rules_apply_to_every_shard_of_the_process_from_its_next_batch() -> None:
    live = LiveRules(RULES)
    a, b = ShardLogic(live, None, BINDING, None), ShardLogic(live, None, BINDING, None)
    assert alerts(step(a, raw("amr-1", 1, T0_MS, battery=40.0))) == []
    live.current = msgspec.structs.replace(RULES, low_battery_pct=50.0, battery_ok_pct=55.0)
    out = step(a, raw("amr-1", 2, T0_MS + 1000, battery=40.0))
    assert [(kind, s.report.seq) for kind, s in zip(alerts(out), out.states, strict=True)] == [
        (("low_battery", "amr-1:low_battery:0:0:2"), 2)
    ]
    out = step(b, raw("amr-9", 1, T0_MS, battery=45.0))
    assert [kind for kind, _ in alerts(out)] == ["low_battery"]
    assert a.rules is b.rules is live.current


def test_a_shorter_offline_after_applies_at_the_next_progress_mark() -> None:
    live = LiveRules(RULES)  # offline after 30 s
    logic = ShardLogic(live, None, BINDING, None)
    step(logic, raw("amr-1", 1, T0_MS))
    assert step(logic, (0, T0_MS + 10_000)) == Out()
    live.current = msgspec.structs.replace(RULES, offline_after_s=5.0)
    out = step(logic, (0, T0_MS + 10_001))
    # Offline as of its new deadline (last seen + 5 s), judged at the first mark after.
    assert alerts(out) == [("offline", f"amr-1:offline:{T0_MS + 5_000}")]


@pytest.mark.parametrize(("lateness", "close_s"), [(25.0, 55), (0.0, 30), (10.0, 40)])
def test_a_changed_lateness_moves_the_close_of_open_windows(lateness: float, close_s: int) -> None:
    live = LiveRules(QUIET)  # lateness 10 s
    logic = ShardLogic(live, None, BINDING, None)
    # Event time 30 s into the minute, arrived at T0: closes at T0 + 60 - 30 + lateness.
    step(logic, raw("a", 1, T0_MS, at=30.0))
    live.current = msgspec.structs.replace(QUIET, allowed_lateness_s=lateness)
    assert step(logic, (0, T0_MS + close_s * 1000 - 1)) == Out()
    out = step(logic, (0, T0_MS + close_s * 1000))
    assert [(w.robot_id, w.count) for w in out.windows] == [("a", 1)]


def test_a_restated_watermark_is_in_the_next_snapshot() -> None:
    live = LiveRules(QUIET)
    logic = ShardLogic(live, None, BINDING, None)
    step(logic, raw("a", 1, T0_MS, at=30.0))
    before = logic.snapshot()
    live.current = msgspec.structs.replace(QUIET, allowed_lateness_s=25.0)
    step(logic)
    after = logic.snapshot()
    assert after != before
    restored = ShardLogic(live, None, BINDING, after)
    assert restored.robots["a"].windows.offset == logic.robots["a"].windows.offset == 30.0 - 25.0


def test_a_sampled_report_is_traced_as_a_child_of_its_ingest_span() -> None:
    exporter = InMemorySpanExporter()
    spans = FlowSpans(SimpleSpanProcessor(exporter), Resource.create({"service.name": "t"}))
    logic = shard(spans=spans)
    out = step(logic, raw("amr-1", 1, T0_MS, traceparent=TP, partition=1, offset=5))
    [span] = exporter.get_finished_spans()
    assert span.name == "process report"
    assert span.parent is not None and f"{span.parent.trace_id:032x}" == TP[3:35]
    assert f"{span.parent.span_id:016x}" == TP[36:52]
    assert span.context is not None and span.context.trace_id == span.parent.trace_id
    assert span.context.trace_flags.sampled
    assert span.attributes is not None
    assert (span.attributes["robot_id"], span.attributes["messaging.kafka.offset"]) == ("amr-1", 5)
    assert span.attributes["applied"] is True
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= span.end_time
    assert out.traced == [(span.context.trace_id, span.context.span_id)]
    # Unsampled (flags 00) or malformed: no span at all.
    step(logic, raw("amr-1", 2, T0_MS, traceparent=TP[:-2] + "00"))
    step(logic, raw("amr-1", 3, T0_MS, traceparent="00-zz"))
    step(logic, raw("amr-1", 4, T0_MS, traceparent="00-" + "0" * 32 + TP[35:]))
    step(logic, raw("amr-1", 5, T0_MS, traceparent=TP[:10] + "xyz" + TP[13:]))
    assert len(exporter.get_finished_spans()) == 1


# --- snapshots ----------------------------------------------------------------------------


def busy_shard() -> ShardLogic:
    logic = shard()
    step(
        logic,
        raw("amr-1", 1, T0_MS, battery=5.0, partition=0),
        raw("amr-2", 1, T0_MS + 10, at=-50.0, partition=1),
        raw("amr-2", 0, T0_MS + 20, partition=1),
        Control("amr-2", "reset_order", "op", 1, 4, T0_MS + 30),
        (1, T0_MS + 35_000),
    )
    return logic


AFTER = [
    raw("amr-1", 2, T0_MS + 20_000, at=70.0),
    (0, T0_MS + 100_000),
    raw("amr-2", 0, T0_MS + 110_000, partition=1),
    (1, T0_MS + 200_000),
    raw("amr-3", 1, T0_MS + 210_000, partition=1),
]


def test_a_snapshot_is_msgpack_bound_to_the_log_and_restores_the_same_shard() -> None:
    logic = busy_shard()
    snap = logic.snapshot()
    state = msgspec.msgpack.decode(snap, type=ShardState)
    assert (state.format, state.binding) == (SHARD_FORMAT, BINDING)
    assert state.robots == logic.robots
    assert not state.robots["amr-2"].live.online and state.robots["amr-2"].live.reset_pending
    restored = shard(snap)
    assert restored.robots == logic.robots
    # The restored shard goes on exactly like the one that never stopped, timers included.
    for item in AFTER:
        assert step(restored, item) == step(logic, item)
    assert restored.robots == logic.robots


@pytest.mark.parametrize(
    "resume",
    [
        lambda snap: shard(snap, binding="binding-y"),
        lambda snap: shard(
            msgspec.msgpack.encode(
                msgspec.structs.replace(
                    msgspec.msgpack.decode(snap, type=ShardState), format=SHARD_FORMAT + 1
                )
            )
        ),
        lambda snap: shard(b"\x00not msgpack"),
        lambda snap: shard(msgspec.msgpack.encode({"robots": [1, 2]})),
    ],
    ids=["other-binding", "other-format", "garbage", "wrong-shape"],
)
def test_a_snapshot_of_another_log_or_format_starts_the_shard_empty(
    resume: Callable[[bytes], ShardLogic],
) -> None:
    logic = resume(busy_shard().snapshot())
    assert logic.robots == {}
    # The replayed log then builds the state again from nothing.
    out = step(logic, raw("amr-1", 1, T0_MS))
    assert (out.applied, logic.robots["amr-1"].applied) == (1, 1)
    assert msgspec.msgpack.decode(logic.snapshot(), type=ShardState).robots.keys() == {"amr-1"}


def test_a_snapshot_is_encoded_again_only_after_a_change() -> None:
    calls: list[int] = []
    logic = ShardLogic(RULES, None, BINDING, None, lambda: calls.append(1))
    empty = logic.snapshot()
    assert msgspec.msgpack.decode(empty, type=ShardState).robots == {}
    step(logic, raw("amr-1", 1, T0_MS))
    first = logic.snapshot()
    assert logic.snapshot() is first
    step(logic, (0, T0_MS + 1000))  # nothing due: nothing changed
    assert logic.snapshot() is first
    step(logic, raw("amr-1", 1, T0_MS + 2000))  # a duplicate still moves last_seen
    second = logic.snapshot()
    assert second != first
    assert msgspec.msgpack.decode(second, type=ShardState).robots == logic.robots
    assert len(calls) == 5


# --- one robot's failure stays its own ----------------------------------------------------


def failing_for(robot: str, real: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for the step function ``real`` that raises for ``robot`` only."""

    def step_fn(state: Any, *args: Any) -> Any:
        who = state.robot_id if state is not None else args[0].robot_id
        if who == robot:
            raise RuntimeError(f"boom for {robot}")
        return real(state, *args)

    return step_fn


def test_an_exception_in_a_report_step_is_a_dead_letter_and_the_state_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logic = shard()
    step(logic, raw("bad", 1, T0_MS), raw("good", 1, T0_MS))
    before = msgspec.msgpack.encode(logic.robots["bad"])
    monkeypatch.setattr(dataflows.shard, "on_report", failing_for("bad", on_report))
    failing = raw("bad", 2, T0_MS + 10, partition=0, offset=77)
    out = step(logic, failing, raw("good", 2, T0_MS + 20))
    [letter] = out.dead
    assert (letter.kind, letter.key, letter.value, letter.offset) == (
        "error",
        b"bad",
        failing[1],
        77,
    )
    assert "RuntimeError: boom for bad" in letter.reason
    assert out.errors == 1
    assert [(s.report.robot_id, s.report.seq) for s in out.states] == [("good", 2)]
    assert msgspec.msgpack.encode(logic.robots["bad"]) == before
    monkeypatch.undo()
    out = step(logic, raw("bad", 2, T0_MS + 30))
    assert (out.applied, out.errors, logic.robots["bad"].live.report.seq) == (1, 0, 2)


def test_an_exception_in_a_progress_step_drops_what_the_timer_was_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logic = shard()
    step(logic, raw("bad", 1, T0_MS, partition=1), raw("good", 1, T0_MS))
    logic.snapshot()
    monkeypatch.setattr(dataflows.shard, "on_progress", failing_for("bad", on_progress))
    # Offline due at +30 s and the window at +70 s: one timer for both.
    out = step(logic, (1, T0_MS + 70_000))
    [letter] = out.dead
    assert (letter.kind, letter.key, letter.partition, letter.offset) == ("error", b"bad", 1, -1)
    assert "progress step" in letter.reason
    assert (out.errors, out.states, out.alerts, out.windows) == (1, [], [], [])
    # The failing robot is offline with no windows, so the same timer does not fail
    # again at the next mark, and the snapshot holds what the shard now holds.
    bad = logic.robots["bad"]
    assert (bad.live.online, bad.windows.open) == (False, {})
    assert msgspec.msgpack.decode(logic.snapshot(), type=ShardState).robots == logic.robots
    assert step(logic, (1, T0_MS + 120_000)) == Out()
    # The other robot's timers still run.
    out = step(logic, (0, T0_MS + 70_000))
    assert [(a.robot_id, a.kind) for a in out.alerts] == [("good", "offline")]
    assert [(w.robot_id, w.count) for w in out.windows] == [("good", 1)]


def test_an_exception_in_a_control_step_keeps_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    logic = shard()
    step(logic, raw("bad", 1, T0_MS))
    before = logic.robots["bad"]
    monkeypatch.setattr(dataflows.shard, "on_control", failing_for("bad", on_control))
    out = step(logic, Control("bad", "reset_order", "op", 0, 12, T0_MS + 5))
    assert [(d.kind, d.offset) for d in out.dead] == [("error", 12)]
    assert logic.robots["bad"] is before


# --- properties ---------------------------------------------------------------------------


def per_robot(outs: Iterable[Out], robot: str) -> dict[str, list[Any]]:
    """What a robot's items produced, in order."""
    got: dict[str, list[Any]] = {"states": [], "alerts": [], "windows": [], "dead": []}
    for out in outs:
        got["states"] += [s for s in out.states if s.report.robot_id == robot]
        got["alerts"] += [a for a in out.alerts if a.robot_id == robot]
        got["windows"] += [w for w in out.windows if w.robot_id == robot]
        got["dead"] += [d for d in out.dead if d.key == robot.encode()]
    return got


@settings(max_examples=20, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 15_000),  # arrival clock advance, ms
            st.integers(0, 49),  # robot
            st.integers(0, 12),  # seq: applied, stale and duplicate ones
            st.floats(-90.0, 60.0),  # event time relative to arrival
            st.booleans(),  # a progress mark of the robot's partition instead
        ),
        min_size=50,
        max_size=250,
    ),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=20),
)
def test_a_shard_of_50_robots_gives_each_the_result_it_would_get_alone(
    steps: list[tuple[int, int, int, float, bool]], chunks: list[int]
) -> None:
    now = T0_MS
    items: list[Item] = []
    for advance, i, seq, ahead, mark in steps:
        now += advance
        if mark:
            items.append((i % 3, now))
        else:
            at = (now - T0_MS) / 1000 + ahead
            items.append(raw(f"amr-{i}", seq, now, at=at, partition=i % 3, battery=seq * 8.0))
    items += [(p, now + 3_600_000) for p in range(3)]  # the end: everything closes

    together = shard()
    outs, rest = [], list(items)
    for size in chunks * len(items):  # batches of many sizes
        if not rest:
            break
        outs.append(step(together, *rest[:size]))
        rest = rest[size:]

    for i in range(50):
        robot = f"amr-{i}"
        alone = shard()
        mine = [it for it in items if isinstance(it, tuple) and (len(it) == 2 or it[0] == robot)]
        expected = per_robot([step(alone, *mine)], robot)
        assert per_robot(outs, robot) == expected
        assert together.robots.get(robot) == alone.robots.get(robot)


# -- the whole schema domain ------------------------------------------------------------

ROBOT_IDS = st.one_of(
    st.sampled_from(["a", "Z" * 64, "0" + "_.:-" * 15 + "abc"]),
    st.from_regex(ROBOT_ID_PATTERN.removesuffix("(?!\\n)"), fullmatch=True),
)
ORDER = st.one_of(st.sampled_from([0, 1, 2, 2**53 - 1, 2**53]), st.integers(0, 2**53))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339(local: datetime, offset_min: int) -> str:
    """``local`` (naive) written with a UTC offset of ``offset_min`` minutes ("Z" for 0)."""
    if offset_min == 0:
        return local.isoformat() + "Z"
    sign = "+" if offset_min > 0 else "-"
    hours, minutes = divmod(abs(offset_min), 60)
    return f"{local.isoformat()}{sign}{hours:02d}:{minutes:02d}"


@st.composite
def timestamps(draw: st.DrawFn, arrival_ms: int, rules: Rules) -> str:
    """Any RFC 3339 time of years 1-9999, often within the accepted range of ``arrival_ms``."""
    offset = draw(st.one_of(st.sampled_from([0, -1439, 1439]), st.integers(-1439, 1439)))
    if draw(st.booleans()):
        return rfc3339(draw(st.datetimes()), offset)  # any local time, any offset
    ahead_us = draw(
        st.one_of(
            st.sampled_from([0, round(rules.max_future_s * 1e6), -round(rules.max_age_s * 1e6)]),
            st.integers(-round(rules.max_age_s * 1e6), round(rules.max_future_s * 1e6)),
        )
    )
    instant = EPOCH + timedelta(milliseconds=arrival_ms)
    try:
        local = (instant + timedelta(microseconds=ahead_us, minutes=offset)).replace(tzinfo=None)
    except OverflowError:
        local = draw(st.sampled_from([datetime.min, datetime.max]))
    return rfc3339(local, offset)


@st.composite
def wire_reports(draw: st.DrawFn, robot: str, arrival_ms: int, rules: Rules) -> bytes:
    """One report as JSON bytes, every field anywhere in the schema's bounds."""
    value: dict[str, Any] = {
        "robot_id": robot,
        "seq": draw(ORDER),
        "ts": draw(timestamps(arrival_ms, rules)),
        "status": draw(st.sampled_from(STATUSES)),
        "battery": draw(st.one_of(st.sampled_from([0.0, 100.0]), st.floats(0.0, 100.0))),
        "pose": {
            "x": draw(st.one_of(st.sampled_from([-1e9, 1e9]), st.floats(-1e9, 1e9))),
            "y": draw(st.one_of(st.sampled_from([-1e9, 1e9]), st.floats(-1e9, 1e9))),
            "theta": draw(st.one_of(st.sampled_from([-1e6, 1e6]), st.floats(-1e6, 1e6))),
        },
    }
    optional = {
        "boot": ORDER,
        "speed": st.one_of(st.sampled_from([0.0, 1000.0]), st.floats(0.0, 1000.0)),
        "errors": st.one_of(st.just(["e" * 64] * 16), st.lists(st.text(max_size=64), max_size=16)),
        "site": ROBOT_IDS,
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            value[name] = draw(strategy)
    return msgspec.json.encode(value)


ARRIVALS = st.one_of(
    st.sampled_from([0, 1, T0_MS, MAX_MS - 1, MAX_MS]),
    st.integers(0, MAX_MS),
    st.integers(T0_MS - 10**9, T0_MS + 10**9),  # realistic
    st.integers(0, 10**9),  # the epoch
    st.integers(MAX_MS - 10**9, MAX_MS),  # the last days of year 9999
)

# Rules anywhere Settings lets them be (where Settings sets no bound: absurd values).
DOMAIN_RULES = st.builds(
    Rules,
    offline_after_s=st.sampled_from([0.001, 30.0, 1e9, math.inf]),
    low_battery_pct=st.just(20.0),
    battery_ok_pct=st.just(25.0),
    window_s=st.sampled_from([1, 7, 60, 3600, 86_400]),  # FLEETPULSE_WINDOW_S: at most a day
    allowed_lateness_s=st.sampled_from([0.0, 10.0, 1e6, 1e300]),
    max_future_s=st.sampled_from([0.0, 300.0, 31_536_000.0]),  # Settings' bounds
    max_age_s=st.sampled_from([0.001, 604_800.0, 315_360_000.0]),
    stuck_after=st.sampled_from([1, 3, 10]),
    max_robots_per_shard=st.sampled_from([0, 0, 1, 3]),
    book=st.sampled_from([RuleBook(), BOOK, DOMAIN_BOOK]),
).flatmap(
    # Retirement after some multiple of offline_after_s (it must be later), or never.
    lambda r: st.sampled_from(
        [0.0] if math.isinf(r.offline_after_s) else [0.0, r.offline_after_s * 2, 3e9]
    ).map(lambda after: msgspec.structs.replace(r, retire_after_s=after))
)


@st.composite
def domain_items(draw: st.DrawFn, rules: Rules) -> list[Item]:
    """Reports, progress marks and controls at any arrival time, often close together."""
    robots = draw(st.lists(ROBOT_IDS, min_size=1, max_size=4, unique=True))
    items: list[Item] = []
    now = draw(ARRIVALS)
    for offset in range(draw(st.integers(1, 30))):
        # Mostly the arrival clock moves on a little (offline, stuck, windows happen);
        # now and then it jumps anywhere, backwards too.
        if draw(st.integers(0, 4)) == 0:
            now = draw(ARRIVALS)
        else:
            now = min(MAX_MS, now + draw(st.integers(0, 120_000)))
        robot = draw(st.sampled_from(robots))
        partition = draw(st.integers(0, 2))
        what = draw(st.sampled_from(["report", "report", "report", "progress", "control"]))
        if what == "report":
            value = draw(wire_reports(robot, now, rules))
            items.append((robot, value, draw(st.sampled_from(["", TP])), partition, offset, now))
        elif what == "progress":
            items.append((partition, draw(st.one_of(st.just(now), ARRIVALS))))
        else:
            action = draw(st.sampled_from(["reset_order", "reset_order", "retire"]))
            items.append(Control(robot, action, "op", partition, offset, now))
    return items


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), rules=DOMAIN_RULES, cut=st.integers(0, 30))
def test_reports_from_the_whole_schema_domain_never_make_the_logic_fail(
    data: st.DataObject, rules: Rules, cut: int
) -> None:
    items = data.draw(domain_items(rules))
    logic = shard(rules=rules)
    outs = [step(logic, *items[:cut])]
    # A snapshot taken half way restores the same shard, which takes the rest.
    snap = logic.snapshot()
    restored = shard(snap, rules=rules)
    assert restored.robots == logic.robots
    outs += [step(restored, *items[cut:])]
    outs += [step(restored, *((p, ms) for p in range(3) for ms in (MAX_MS, 0)))]
    assert shard(restored.snapshot(), rules=rules).robots == restored.robots

    dead = [d for out in outs for d in out.dead]
    assert [d.reason for d in dead if d.kind == "error"] == []
    assert sum(out.errors for out in outs) == 0
    # No report silently lost: each is applied, stale, duplicate or refused (a late one
    # is also counted among the first three).
    reports = sum(1 for it in items if isinstance(it, tuple) and len(it) == 6)
    refused = sum(1 for d in dead if d.kind in ("invalid", "key", "future", "past", "limit"))
    counted = sum(out.applied + out.stale + out.duplicate for out in outs)
    assert counted + refused == reports
    # Every change of a robot's live state is stamped strictly after the previous one
    # of the same life (a retirement ends one).
    lives: list[list[float]] = []
    stamps: dict[str, list[float]] = {}
    for out in outs:
        ends = sorted(out.retired, key=lambda r: r.states)
        for i, s in enumerate([*out.states, None]):
            while ends and ends[0].states == i:
                lives.append(stamps.pop(ends.pop(0).robot_id, []))
            if s is not None:
                stamps.setdefault(s.report.robot_id, []).append(s.updated)
    for updated in [*lives, *stamps.values()]:
        assert all(a < b for a, b in pairwise(updated))
    # A robot is held only while it is within the limit, and a retired one is gone.
    if rules.max_robots_per_shard:
        assert len(restored.robots) <= rules.max_robots_per_shard


def test_the_dataflow_process_collects_young_objects_less_often() -> None:
    """The flow's entry sets the collector's thresholds (dataflows.fleet.tune_gc): young
    objects every 50,000 allocations, the older generations at their usual ratios."""
    import gc

    from dataflows.fleet import GC_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD == (50_000, 20, 100)
    finally:
        gc.set_threshold(*before)
