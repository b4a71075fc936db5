"""The rules file: its schema, errors that name the rule and field, what conditions mean."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetpulse.alert_rules import (
    Clauses,
    Condition,
    Errors,
    Geofence,
    Number,
    RuleBook,
    RulesError,
    StatusSet,
    encode_rules,
    load_rules,
    parse_rules,
)
from fleetpulse.schema import Pose, RobotReport

EXAMPLE = """
rules:
  - name: battery-critical
    scope: {sites: [north]}
    when: {battery: {below: 10}, status: {not_in: [charging]}}
    for_s: 30
    severity: critical
    clear: {battery: {above: 20}}
  - name: left-the-yard
    when: {pose: {outside: [[0, 0], [120, 0], [120, 80], [0, 80]]}}
  - name: e42
    scope: {pattern: "amr-[0-9]+"}
    when: {errors: {codes: [E42]}}
"""


def report(**over: Any) -> RobotReport:
    body: dict[str, Any] = {
        "robot_id": "amr-1",
        "seq": 1,
        "ts": datetime(2026, 1, 1, tzinfo=UTC),
        "status": "moving",
        "battery": 50.0,
        "pose": Pose(10.0, 10.0, 0.0),
        "site": "north",
        **over,
    }
    return RobotReport(**body)


def test_the_example_loads_with_its_defaults() -> None:
    book = load_rules(EXAMPLE)
    crit, fence, e42 = book.rules
    assert (crit.name, crit.for_s, crit.severity) == ("battery-critical", 30.0, "critical")
    assert (fence.for_s, fence.severity, fence.clear) == (0.0, "warning", None)
    assert fence.scope.matcher()("anything", None)  # no scope: every robot
    assert e42.scope.matcher()("amr-17", None) and not e42.scope.matcher()("amr-17x", None)
    assert crit.scope.matcher()("x", "north") and not crit.scope.matcher()("x", "south")
    # JSON is YAML too, and the encoding is stable: the digest names the version.
    again = load_rules(encode_rules(book))
    assert again == book and again.digest == book.digest
    assert load_rules("") == RuleBook() == load_rules("rules: []")


def test_conditions_hold_when_every_clause_holds() -> None:
    crit, fence, e42 = load_rules(EXAMPLE).rules
    assert crit.opens(report(battery=9.5))
    assert not crit.opens(report(battery=9.5, status="charging"))
    assert not crit.opens(report(battery=10.0))  # below is strict
    # Hysteresis: between 10 and 20 neither opens nor clears.
    assert not crit.clears(report(battery=15.0)) and crit.clears(report(battery=20.5))
    assert not fence.opens(report()) and fence.opens(report(pose=Pose(130.0, 10.0, 0.0)))
    assert fence.clears(report())  # default clear: `when` no longer holds
    assert e42.opens(report(errors=["E1", "E42"])) and not e42.opens(report(errors=["E1"]))


def test_a_geofence_follows_a_concave_polygon() -> None:
    u = Geofence(
        inside=[(0, 0), (30, 0), (30, 30), (20, 30), (20, 10), (10, 10), (10, 30), (0, 30)]
    )
    assert u.holds(Pose(5.0, 20.0, 0.0)) and u.holds(Pose(25.0, 20.0, 0.0))
    assert not u.holds(Pose(15.0, 20.0, 0.0))  # in the notch of the U
    assert not u.holds(Pose(-1.0, 5.0, 0.0)) and u.holds(Pose(15.0, 5.0, 0.0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: 3", "rules: Expected `array`, got `int`"),
        ("- a\n- b", "expected a mapping with `rules:`, got list"),
        ("rules: [{name: a}]", "rule 'a' (rules[0]): Object missing required field `when`"),
        (
            "rules: [{name: ok, when: {battery: {below: 5}}}, "
            "{name: bad, when: {battery: {below: low}}}]",
            "rule 'bad' (rules[1]): when.battery.below: Expected `float | null`, got `str`",
        ),
        (
            "rules: [{name: b, when: {battery: {below: 5, above: 1}}}]",
            "rule 'b' (rules[0]): when.battery: give exactly one of below, above, equals",
        ),
        ("rules: [{name: c, when: {}}]", "rule 'c' (rules[0]): when: give at least one clause"),
        (
            "rules: [{name: d, when: {pose: {inside: [[0, 0], [1, 1]]}}}]",
            "rule 'd' (rules[0]): when.pose: a polygon has 3 to 1000 points",
        ),
        (
            "rules: [{name: e, when: {status: {in: [flying]}}}]",
            "rule 'e' (rules[0]): when.status.in[0]: Invalid enum value 'flying'",
        ),
        (
            "rules: [{name: f, when: {speed: {above: 1}}, severity: loud}]",
            "rule 'f' (rules[0]): severity: Invalid enum value 'loud'",
        ),
        (
            "rules: [{name: g, when: {speed: {above: 1}}, for_s: -1}]",
            "rule 'g' (rules[0]): for_s: Expected `float` >= 0",
        ),
        (
            "rules: [{name: h, when: {speed: {above: 1}}, scope: {pattern: '('}}]",
            "rule 'h' (rules[0]): scope.pattern: not a regular expression",
        ),
        (
            "rules: [{name: i, when: {speed: {above: 1}}}, {name: i, when: {speed: {below: 1}}}]",
            "rule 'i' (rules[1]): name: also the name of rules[0]",
        ),
        (
            "rules: [{name: Bad Name, when: {speed: {above: 1}}}]",
            "rule 'Bad Name' (rules[0]): name: Expected `str` matching",
        ),
        (
            "rules: [{name: j, when: {speed: {above: 1}}, colour: red}]",
            "rule 'j' (rules[0]): Object contains unknown field `colour`",
        ),
        (
            "rules: [{name: k, when: {speed: {above: .inf}}}]",
            "rule 'k' (rules[0]): when.speed.above: Expected `float` <= 1000000000000.0",
        ),
        ("rules: [[", "not YAML or JSON"),
        (
            "rules: [{name: s, when: {silence_s: {above: 5}, battery: {below: 5}}}]",
            "rule 's' (rules[0]): when.silence_s: a silence is judged alone",
        ),
        (
            "rules: [{name: s, when: {silence_s: {below: 5}}}]",
            "rule 's' (rules[0]): when.silence_s: give `above`",
        ),
        (
            "rules: [{name: s, when: {silence_s: {above: 5}}, clear: {speed: {above: 1}}}]",
            "rule 's' (rules[0]): clear: the next report clears a silence",
        ),
    ],
)
def test_every_problem_names_the_rule_and_the_field(text: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        load_rules(text, source="rules.yaml")
    assert str(caught.value).startswith("rules.yaml: ")
    assert message in str(caught.value), str(caught.value)


def test_at_most_a_thousand_rules() -> None:
    many = {"rules": [{"name": f"r{i}", "when": {"speed": {"above": 1}}} for i in range(1001)]}
    with pytest.raises(RulesError, match="rules: Expected `array` of length <= 1000"):
        parse_rules(many)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(
    battery=st.floats(0, 100),
    speed=st.floats(0, 5),
    status=st.sampled_from(["idle", "moving", "working", "charging", "error", "estop"]),
    errors=st.lists(st.sampled_from(["E1", "E42", "E7"]), max_size=2),
    x=st.floats(-10, 140),
    distance=st.one_of(st.none(), st.floats(0, 50)),
)
def test_the_compiled_conditions_agree_with_holds(
    battery: float, speed: float, status: str, errors: list[str], x: float, distance: float | None
) -> None:
    """The hot path judges every condition from one mask of clause bits (Clauses), each
    distinct clause evaluated once: the same answers as Condition.holds."""
    book = load_rules(
        EXAMPLE
        + """
  - name: moving-far
    when: {distance_m: {above: 10}, speed: {equals: 1.0}, errors: {present: false}}
"""
    )
    r = report(battery=battery, speed=speed, status=status, errors=errors, pose=Pose(x, 5.0, 0.0))
    conditions = [c for rule in book.rules for c in (rule.when, rule.clear) if c is not None]
    clauses = Clauses(conditions)
    m = clauses.mask(r, distance)
    for cond in conditions:
        need = clauses.need(cond)
        assert (m & need == need) == cond.holds(r, distance), (cond, r)


_BOUNDS = st.sampled_from([0.0, 10.0, 15.0, 20.0, 50.0, 99.5, 100.0])
_POLYGONS = st.sampled_from(
    [
        [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)],
        [(5.0, 5.0), (20.0, 5.0), (12.0, 15.0)],  # overlaps the square
        [(0.0, 0.0), (30.0, 0.0), (30.0, 30.0), (15.0, 5.0), (0.0, 30.0)],  # concave
    ]
)


def _number() -> st.SearchStrategy[Number]:
    return st.one_of(
        st.builds(Number, below=_BOUNDS),
        st.builds(Number, above=_BOUNDS),
        st.builds(Number, equals=_BOUNDS),
    )


_STATUSES = ["idle", "moving", "working", "charging", "error", "estop"]
_CONDITIONS = st.builds(
    Condition,
    battery=st.one_of(st.none(), _number()),
    speed=st.one_of(st.none(), _number()),
    distance_m=st.one_of(st.none(), _number()),
    status=st.one_of(
        st.none(),
        st.builds(StatusSet, in_=st.lists(st.sampled_from(_STATUSES), min_size=1, max_size=3)),
        st.builds(StatusSet, not_in=st.lists(st.sampled_from(_STATUSES), min_size=1, max_size=3)),
    ),
    errors=st.one_of(
        st.none(),
        st.builds(Errors, present=st.booleans()),
        st.builds(Errors, codes=st.lists(st.sampled_from(["E1", "E2", "E3"]), min_size=1)),
    ),
    pose=st.one_of(
        st.none(), st.builds(Geofence, inside=_POLYGONS), st.builds(Geofence, outside=_POLYGONS)
    ),
)


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(
    conditions=st.lists(_CONDITIONS, min_size=1, max_size=12),
    battery=st.one_of(_BOUNDS, st.floats(0, 100)),
    speed=st.one_of(_BOUNDS, st.floats(0, 100)),
    distance=st.one_of(st.none(), _BOUNDS, st.floats(0, 100)),
    status=st.sampled_from(_STATUSES),
    errors=st.lists(st.sampled_from(["E1", "E2", "E3", "E4"]), max_size=3),
    x=st.one_of(st.sampled_from([0.0, 5.0, 10.0, 15.0, 30.0]), st.floats(-5, 35)),
    y=st.one_of(st.sampled_from([0.0, 5.0, 10.0, 15.0, 30.0]), st.floats(-5, 35)),
)
def test_clause_bits_agree_with_holds_for_any_conditions(
    conditions: list[Condition],
    battery: float,
    speed: float,
    distance: float | None,
    status: str,
    errors: list[str],
    x: float,
    y: float,
) -> None:
    """Shared clauses, equal bounds, bounds hit exactly, a polygon used both inside and
    outside, overlapping and concave polygons: the mask agrees with holds everywhere."""
    r = report(battery=battery, speed=speed, status=status, errors=errors, pose=Pose(x, y, 0.0))
    clauses = Clauses(conditions)
    m = clauses.mask(r, distance)
    for cond in conditions:
        need = clauses.need(cond)
        assert (m & need == need) == cond.holds(r, distance), (cond, r, distance)
