"""Alert rules as data: the rules file's schema, its loading, and what a condition means.

A rules file (YAML or JSON) holds a list of rules; each names a condition on a robot's
reports that, held for ``for_s`` seconds of event time, opens an incident for that
robot, and a clear condition that closes it::

    rules:
      - name: battery-critical
        scope: {sites: [north]}          # or robots: [...], pattern: "amr-.*"; none: all
        when: {battery: {below: 10}, status: {not_in: [charging]}}
        for_s: 30                        # held this long (event time); 0: at once
        severity: critical               # info | warning | critical
        clear: {battery: {above: 20}}    # default: `when` no longer holds
      - name: left-the-yard
        when: {pose: {outside: [[0, 0], [120, 0], [120, 80], [0, 80]]}}
        severity: warning

A condition holds when every clause in it holds. Clauses: ``battery``, ``speed`` (a
number: ``below``, ``above`` or ``equals``), ``status`` (``in`` or ``not_in`` a set),
``errors`` (``present: true/false``, or ``codes``: any of them reported), ``pose``
(``inside`` or ``outside`` a polygon of [x, y] points on the site plane: a geofence).

:func:`load_rules` reads and checks a document; every problem is a
:class:`RulesError` naming the rule (by name and index) and the field, e.g.
``rule 'battery-critical' (rules[0]): when.battery.below: Expected `float | null`, got
`str```.
This module is the one definition: the dataflow evaluates it, the API serves and
checks it.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta

from fleetpulse.errors import ConfigError
from fleetpulse.reload import FileWatcher, Reload
from fleetpulse.schema import ROBOT_ID_PATTERN, Pose, RobotId, RobotReport, Status

__all__ = [
    "MAX_RULES",
    "RULE_NAME_PATTERN",
    "Clauses",
    "Condition",
    "Errors",
    "Geofence",
    "Incident",
    "Number",
    "Rule",
    "RuleBook",
    "RulesError",
    "RulesFile",
    "Scope",
    "Severity",
    "StatusSet",
    "Target",
    "encode_rules",
    "load_rules",
    "parse_rules",
    "write_atomically",
]

MAX_RULES = 1000
MAX_POINTS = 1000

Severity = Literal["info", "warning", "critical"]
RULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$(?!\n)"
RuleName = Annotated[
    str,
    Meta(
        pattern=RULE_NAME_PATTERN,
        description="1-64 characters: lower-case letters, digits and _ . - (not first)",
    ),
]
Finite = Annotated[float, Meta(ge=-1e12, le=1e12)]


IncidentState = Literal["open", "closed"]


class Incident(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One incident of one robot under one rule; a new version at each transition."""

    id: str  # "<robot>:<rule>:<boot>:<seq>" of the report that opened it
    robot_id: str
    rule: str
    severity: Severity
    state: IncidentState = "open"
    since: datetime  # event time the condition started holding
    opened_at: datetime  # event time of the report that opened it (>= since + for_s)
    opened_by: tuple[int, int]  # its (boot, seq)
    closed_at: datetime | None = None
    closed_by: tuple[int, int] | None = None  # None while open, or closed by a rule change
    reason: str = ""  # why it closed: "cleared", "rule removed"
    acknowledged_at: datetime | None = None  # when an operator acknowledged it
    acknowledged_by: str = ""  # who (the admin token's fingerprint)

    @property
    def rank(self) -> int:
        """How far along it is; a version of higher rank replaces a lower one."""
        return 2 * (self.state == "closed") + (self.acknowledged_at is not None)


class RulesError(ConfigError):
    """A rules document that cannot be used; the message names the rule and field."""


class Number(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A number compared to one bound: exactly one of ``below``, ``above``, ``equals``."""

    below: Finite | None = None
    above: Finite | None = None
    equals: Finite | None = None

    def check(self) -> str | None:
        given = [v for v in (self.below, self.above, self.equals) if v is not None]
        return None if len(given) == 1 else "give exactly one of below, above, equals"

    def holds(self, value: float) -> bool:
        if self.below is not None:
            return value < self.below
        if self.above is not None:
            return value > self.above
        return value == self.equals


class StatusSet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The status is ``in`` the set, or ``not_in`` it (exactly one)."""

    in_: list[Status] | None = msgspec.field(default=None, name="in")
    not_in: list[Status] | None = None

    def check(self) -> str | None:
        if (self.in_ is None) == (self.not_in is None):
            return "give exactly one of in, not_in"
        return None

    def holds(self, status: str) -> bool:
        return status in self.in_ if self.in_ is not None else status not in (self.not_in or ())


class Errors(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The report has errors (``present``), or one of ``codes``."""

    present: bool | None = None
    codes: list[Annotated[str, Meta(min_length=1, max_length=64)]] | None = None

    def check(self) -> str | None:
        if (self.present is None) == (self.codes is None):
            return "give exactly one of present, codes"
        return None

    def holds(self, errors: Sequence[str]) -> bool:
        if self.codes is not None:
            return any(code in self.codes for code in errors)
        return bool(errors) == self.present


Point = tuple[Finite, Finite]


class Geofence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The pose is ``inside`` or ``outside`` a polygon (exactly one; 3+ points)."""

    inside: list[Point] | None = None
    outside: list[Point] | None = None

    def check(self) -> str | None:
        if (self.inside is None) == (self.outside is None):
            return "give exactly one of inside, outside"
        points = self.inside if self.inside is not None else self.outside
        if not 3 <= len(points or ()) <= MAX_POINTS:
            return f"a polygon has 3 to {MAX_POINTS} points"
        return None

    def holds(self, pose: Pose) -> bool:
        if self.inside is not None:
            return _inside(self.inside, pose.x, pose.y)
        return not _inside(self.outside or [], pose.x, pose.y)


def _inside(polygon: Sequence[Point], x: float, y: float) -> bool:
    """Even-odd rule (a point on the boundary may fall either way)."""
    inside = False
    n = len(polygon)
    for i in range(n):
        (x1, y1), (x2, y2) = polygon[i], polygon[(i + 1) % n]
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


class Condition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Clauses on one report; the condition holds when every clause given holds.

    Two are derived rather than read off the report: ``distance_m``, the distance the
    robot travelled in its last closed window (the newest window that ended at or before
    the report's ``ts``; none yet: the clause does not hold), and ``silence_s``, the time
    since the robot's last report arrived (only ``above``, and alone in its condition:
    it is judged on the arrival clock, not on a report).
    """

    battery: Number | None = None
    speed: Number | None = None
    status: StatusSet | None = None
    errors: Errors | None = None
    pose: Geofence | None = None
    distance_m: Number | None = None
    silence_s: Number | None = None

    def clauses(self) -> list[tuple[str, Number | StatusSet | Errors | Geofence]]:
        fields = ("battery", "speed", "status", "errors", "pose", "distance_m", "silence_s")
        return [(f, c) for f in fields if (c := getattr(self, f)) is not None]

    def holds(self, report: RobotReport, distance: float | None = None) -> bool:
        """Whether every clause holds for ``report`` (``distance``: the last closed
        window's distance before it, for ``distance_m``)."""
        b, sp, st, er, po = self.battery, self.speed, self.status, self.errors, self.pose
        d = self.distance_m
        return (
            (b is None or b.holds(report.battery))
            and (sp is None or sp.holds(report.speed))
            and (st is None or st.holds(report.status))
            and (er is None or er.holds(report.errors))
            and (po is None or po.holds(report.pose))
            and (d is None or (distance is not None and d.holds(distance)))
        )


class Clauses:
    """The clauses of some conditions, each distinct one a bit of a mask (the hot path's
    form of :meth:`Condition.holds`).

    :meth:`mask` evaluates every clause once per report: a numeric field's bounds are
    sorted, so one bisection finds all the ``below`` (or ``above``) bounds that hold; a
    status or an error code is one dict lookup; a polygon is tested only when the point
    is in its bounding box. A condition holds when all its bits are set::

        need = clauses.need(cond)
        holds = clauses.mask(report, distance) & need == need
    """

    def __init__(self, conditions: Sequence[Condition]) -> None:
        self._bit: dict[bytes, int] = {}
        numbers: dict[str, list[tuple[Number, int]]] = {}
        self._status: list[tuple[frozenset[str], bool, int]] = []  # (set, in, bit)
        self._present = self._absent = 0  # errors present: true / false
        self._codes: dict[str, int] = {}  # error code -> bits of the clauses naming it
        # (x min, x max, y min, y max, polygon, bit if inside, bit if outside)
        self._fences: list[tuple[float, float, float, float, list[Point], int, int]] = []
        for cond in conditions:
            for name, clause in cond.clauses():
                if name == "silence_s":
                    continue  # judged on the arrival clock, not on a report
                key = msgspec.json.encode((name, clause))
                if key in self._bit:
                    continue
                bit = self._bit[key] = 1 << len(self._bit)
                if isinstance(clause, Number):
                    numbers.setdefault(name, []).append((clause, bit))
                elif isinstance(clause, StatusSet):
                    inside = clause.in_ is not None
                    self._status.append((frozenset(clause.in_ or clause.not_in or ()), inside, bit))
                elif isinstance(clause, Errors):
                    if clause.codes is not None:
                        for code in clause.codes:
                            self._codes[code] = self._codes.get(code, 0) | bit
                    elif clause.present:
                        self._present |= bit
                    else:
                        self._absent |= bit
                else:
                    self._fence(clause, bit)
        self._battery = _Bounds(numbers.get("battery", []))
        self._speed = _Bounds(numbers.get("speed", []))
        self._distance = _Bounds(numbers.get("distance_m", []))
        self._by_status: dict[str, int] = {}
        self._outside = 0  # every "outside" bit: holds unless the point is inside
        for *_, outside in self._fences:
            self._outside |= outside

    def _fence(self, clause: Geofence, bit: int) -> None:
        polygon = clause.inside if clause.inside is not None else clause.outside or []
        inside, outside = (bit, 0) if clause.inside is not None else (0, bit)
        for i, (*box, points, was_in, was_out) in enumerate(self._fences):
            if points == polygon:  # the same polygon inside and outside: one test
                self._fences[i] = (*box, points, was_in | inside, was_out | outside)  # type: ignore[assignment]
                return
        xs = [p[0] for p in polygon]
        ys = [p[1] for p in polygon]
        self._fences.append((min(xs), max(xs), min(ys), max(ys), polygon, inside, outside))

    @property
    def size(self) -> int:
        """How many bits a mask has: the distinct clauses."""
        return len(self._bit)

    def need(self, cond: Condition) -> int:
        """The bits that must all be set for ``cond`` to hold."""
        need = 0
        for name, clause in cond.clauses():
            if name != "silence_s":
                need |= self._bit[msgspec.json.encode((name, clause))]
        return need

    def mask(self, report: RobotReport, distance: float | None = None) -> int:
        """The bits of the clauses that hold for ``report`` (``distance``: the last closed
        window's distance before it, for ``distance_m``; None: those clauses do not hold)."""
        pose = report.pose
        return self.mask_of(
            report.battery, report.speed, report.status, report.errors, pose.x, pose.y, distance
        )

    def mask_of(
        self,
        battery: float,
        speed: float,
        status: str,
        errors: Sequence[str],
        x: float,
        y: float,
        distance: float | None = None,
    ) -> int:
        """:meth:`mask` of a report's fields."""
        m = self._battery.bits(battery) | self._speed.bits(speed)
        if distance is not None:
            m |= self._distance.bits(distance)
        if self._status:
            bits = self._by_status.get(status)
            if bits is None:
                bits = self._by_status[status] = sum(
                    bit for wanted, inside, bit in self._status if (status in wanted) == inside
                )
            m |= bits
        if errors:
            m |= self._present
            if self._codes:
                for code in errors:
                    m |= self._codes.get(code, 0)
        else:
            m |= self._absent
        if self._fences:
            m |= self._outside
            for x0, x1, y0, y1, polygon, inside, outside in self._fences:
                if x0 <= x <= x1 and y0 <= y <= y1 and _inside(polygon, x, y):
                    m = (m | inside) & ~outside
        return m


class _Bounds:
    """Clauses on one number, sorted by bound: the bits that hold for a value at once."""

    __slots__ = ("_above", "_above_bits", "_below", "_below_bits", "_equals", "any")

    def __init__(self, clauses: Sequence[tuple[Number, int]]) -> None:
        below = sorted((c.below, bit) for c, bit in clauses if c.below is not None)
        above = sorted((c.above, bit) for c, bit in clauses if c.above is not None)
        self._below = [b for b, _ in below]
        # value < bound holds for the bounds from bisect_right(value) on: suffix masks
        self._below_bits = [0] * (len(below) + 1)
        for i in range(len(below) - 1, -1, -1):
            self._below_bits[i] = self._below_bits[i + 1] | below[i][1]
        self._above = [b for b, _ in above]
        # value > bound holds for the bounds before bisect_left(value): prefix masks
        self._above_bits = [0] * (len(above) + 1)
        for i, (_, bit) in enumerate(above):
            self._above_bits[i + 1] = self._above_bits[i] | bit
        self._equals: dict[float, int] = {}
        for c, bit in clauses:
            if c.equals is not None:
                self._equals[c.equals] = self._equals.get(c.equals, 0) | bit
        self.any = bool(clauses)

    def bits(self, value: float) -> int:
        if not self.any:
            return 0
        m = self._below_bits[bisect.bisect_right(self._below, value)] if self._below else 0
        if self._above:
            m |= self._above_bits[bisect.bisect_left(self._above, value)]
        if self._equals:
            m |= self._equals.get(value, 0)
        return m


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which robots a rule watches: any of the sites, ids, or ids matching the pattern
    (a full match); nothing given: every robot."""

    sites: list[Annotated[str, Meta(pattern=ROBOT_ID_PATTERN)]] | None = None
    robots: list[RobotId] | None = None
    pattern: Annotated[str, Meta(min_length=1, max_length=256)] | None = None

    def check(self) -> str | None:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                return f"pattern: not a regular expression ({exc})"
        return None

    def matcher(self) -> _Match:
        return _Match(self)


class _Match:
    """A scope compiled for the hot path."""

    __slots__ = ("all", "pattern", "robots", "sites")

    def __init__(self, scope: Scope) -> None:
        self.sites = frozenset(scope.sites or ())
        self.robots = frozenset(scope.robots or ())
        self.pattern = re.compile(scope.pattern) if scope.pattern is not None else None
        self.all = scope.sites is None and scope.robots is None and scope.pattern is None

    def __call__(self, robot_id: str, site: str | None) -> bool:
        if self.all or robot_id in self.robots or (site is not None and site in self.sites):
            return True
        return self.pattern is not None and self.pattern.fullmatch(robot_id) is not None


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One alert rule: a condition held for ``for_s`` opens an incident per robot."""

    name: RuleName
    when: Condition
    scope: Scope = Scope()
    for_s: Annotated[float, Meta(ge=0, le=86_400)] = 0.0
    severity: Severity = "warning"
    clear: Condition | None = None  # None: the incident closes when `when` stops holding
    description: Annotated[str, Meta(max_length=1000)] = ""

    @property
    def silence_s(self) -> float | None:
        """For a rule on the time since the last report: that time; else None."""
        clause = self.when.silence_s
        return None if clause is None else clause.above

    def opens(self, report: RobotReport, distance: float | None = None) -> bool:
        return self.when.holds(report, distance)

    def clears(self, report: RobotReport, distance: float | None = None) -> bool:
        if self.clear is not None:
            return self.clear.holds(report, distance)
        return not self.when.holds(report, distance)


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where incident notifications go: a webhook, for some severities and rules.

    Each notification is one POST of JSON, signed (``X-Fleetpulse-Signature``, as the
    ingest server checks robots' posts) with the target's secret from
    ``FLEETPULSE_NOTIFY_SECRETS`` (``<target name>=<secret>``); ``format: slack`` sends
    a Slack-style ``{"text": ...}`` body instead of the incident.
    """

    name: RuleName
    url: Annotated[str, Meta(pattern=r"^https?://[^\s]+$", max_length=2000)]
    severities: list[Severity] | None = None  # None: every severity
    rules: list[RuleName] | None = None  # None: every rule
    format: Literal["incident", "slack"] = "incident"

    def wants(self, incident: Incident) -> bool:
        return (self.severities is None or incident.severity in self.severities) and (
            self.rules is None or incident.rule in self.rules
        )


class RuleBook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole rules document: the rules, and where their incidents are sent."""

    rules: Annotated[list[Rule], Meta(max_length=MAX_RULES)] = msgspec.field(default_factory=list)
    targets: Annotated[list[Target], Meta(max_length=100)] = msgspec.field(default_factory=list)

    @property
    def digest(self) -> str:
        """A short sha256 of the rules (which version is in force)."""
        return hashlib.sha256(encode_rules(self)).hexdigest()[:12]


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_RULE_AT = re.compile(r"^\.rules\[(?P<i>\d+)\](?P<rest>.*)$")


def parse_rules(data: Any, source: str = "rules") -> RuleBook:
    """A checked :class:`RuleBook` from decoded YAML/JSON ``data``; raises RulesError."""
    if data is None:
        data = {}
    try:
        book = msgspec.convert(data, RuleBook)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        msg, path = (m.group("msg"), m.group("path") or "") if m else (str(exc), "")
        raise RulesError(f"{source}: {_where(data, path)}{msg}") from None
    seen: dict[str, int] = {}
    for i, rule in enumerate(book.rules):
        who = f"rule {rule.name!r} (rules[{i}])"
        if rule.name in seen:
            raise RulesError(f"{source}: {who}: name: also the name of rules[{seen[rule.name]}]")
        seen[rule.name] = i
        for part, cond in (("when", rule.when), ("clear", rule.clear)):
            if cond is None:
                continue
            if not cond.clauses():
                raise RulesError(f"{source}: {who}: {part}: give at least one clause")
            for field, clause in cond.clauses():
                problem = clause.check()
                if problem is not None:
                    raise RulesError(f"{source}: {who}: {part}.{field}: {problem}")
                if isinstance(clause, Number) and not math.isfinite(
                    next(v for v in (clause.below, clause.above, clause.equals) if v is not None)
                ):
                    raise RulesError(f"{source}: {who}: {part}.{field}: must be finite")
        problem = rule.scope.check()
        if problem is not None:
            raise RulesError(f"{source}: {who}: scope.{problem}")
        problem = _silence_problem(rule)
        if problem is not None:
            raise RulesError(f"{source}: {who}: {problem}")
    names: dict[str, int] = {}
    for i, target in enumerate(book.targets):
        if target.name in names:
            raise RulesError(
                f"{source}: target {target.name!r} (targets[{i}]): name: also the name of "
                f"targets[{names[target.name]}]"
            )
        names[target.name] = i
    return book


def _silence_problem(rule: Rule) -> str | None:
    """What is wrong with a rule's use of ``silence_s``, if anything."""
    for part, cond in (("when", rule.when), ("clear", rule.clear)):
        if cond is None or cond.silence_s is None:
            continue
        if part == "clear":
            return "clear.silence_s: the next report clears a silence; leave clear out"
        if cond.silence_s.above is None:
            return "when.silence_s: give `above` (seconds without a report)"
        if len(cond.clauses()) > 1:
            return "when.silence_s: a silence is judged alone; give no other clause with it"
        if rule.clear is not None:
            return "clear: the next report clears a silence; leave clear out"
    return None


def _where(data: Any, path: str) -> str:
    """``rule 'name' (rules[i]): field: `` for a path inside a rule, else the path."""
    m = _RULE_AT.match(path)
    if m is None:
        return f"{path.lstrip('.')}: " if path else ""
    i, rest = int(m.group("i")), m.group("rest").lstrip(".")
    name = None
    rules = data.get("rules") if isinstance(data, dict) else None
    if isinstance(rules, list) and i < len(rules) and isinstance(rules[i], dict):
        name = rules[i].get("name")
    who = f"rule {name!r} (rules[{i}])" if isinstance(name, str) else f"rules[{i}]"
    return f"{who}: {rest}: " if rest else f"{who}: "


def load_rules(text: str | bytes, source: str = "rules") -> RuleBook:
    """Parse a YAML (or JSON) rules document; raises RulesError naming what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not YAML or JSON ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise RulesError(f"{source}: expected a mapping with `rules:`, got {type(data).__name__}")
    return parse_rules(data, source)


_encoder = msgspec.json.Encoder(order="deterministic")


def encode_rules(book: RuleBook) -> bytes:
    """The document as compact JSON (fields in a fixed order)."""
    return _encoder.encode(book)


log = logging.getLogger("fleetpulse.rules")


class RulesFile(FileWatcher[RuleBook]):
    """``FLEETPULSE_RULES_FILE``: read at start (a bad file stops the start, naming the
    problem), then looked at about once a second; a good change replaces the rules
    whole, a bad one is logged and the last good rules stay.
    """

    def __init__(
        self,
        path: str,
        on_result: Callable[[Reload], None] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        super().__init__(Path(path), interval_s, "fleetpulse-rules")
        self.on_result = on_result
        data = self._read_first(
            lambda why: RulesError(
                f"FLEETPULSE_RULES_FILE={path!r}: cannot read it ({why}); give a "
                "YAML or JSON rules file, or leave the variable empty for no rules"
            )
        )
        self.current = load_rules(data, str(self.path))
        self._lock = threading.Lock()

    def poll(self) -> Reload | None:
        """Look at the file once; what its change came to (None: it did not change)."""
        with self._lock:
            data = self._read_changed()
            if not isinstance(data, bytes):
                return data
            try:
                book = load_rules(data, str(self.path))
            except RulesError as exc:
                return self._done("invalid", str(exc))
            if book == self.current:
                return self._done("unchanged", "")
            before = self.current
            self.current = book
        log.info(
            "rules %s applied from %s: %d rule(s) (were %d, %s)",
            book.digest,
            self.path,
            len(book.rules),
            len(before.rules),
            before.digest,
        )
        self._applied(book)
        return self._done("applied", "")

    def _done(self, result: Reload, problem: str) -> Reload:
        if result == "invalid":
            log.error("%s; the rules in force (%s) stay", problem, self.current.digest)
        if self.on_result is not None:
            self.on_result(result)
        return result


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` in place of ``path`` (through a symlink, at its target): a reader sees the
    old file or the new one, never a part. OSError when the folder is not writable."""
    target = path.resolve()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".rules-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
