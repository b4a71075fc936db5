"""The one schema library: msgspec Structs for the wire, Kafka values, state and API.

The data Structs are ``gc=False``: immutable values that never refer back to anything,
so they cannot be part of a reference cycle, and the garbage collector need not track
the hundreds of thousands a dataflow process holds.

``RobotReport`` is wire contract v1 (DESIGN.md, "Wire contract"): unknown fields are
rejected, every number is bounded (so NaN and Infinity can never pass), and the
order of reports for one robot is ``(boot, seq)`` — clocks are never trusted for order.

Decoders and encoders are built once here and shared by ingest, dataflow and API.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar, get_args, get_origin

import msgspec
from msgspec import Meta

__all__ = [
    "ALERT_KINDS",
    "STATUSES",
    "Alert",
    "AlertKind",
    "LiveState",
    "Pose",
    "RobotId",
    "RobotReport",
    "Status",
    "WindowStats",
    "decode_report",
    "decode_reports",
    "encode",
    "is_robot_id",
    "time_bounds_problem",
]

# The one definition of a robot id (and a site name), used by ingest (msgspec), the
# dataflow's Kafka key check and the query API's cursor. msgspec and Python's re test a
# pattern with search(), where a bare `$` also matches before a final newline, so
# "amr-1\n" would pass; `(?!\n)` closes that. The pattern stays valid ECMA-262 for the
# OpenAPI documents (there `$` is the end of input and the lookahead always holds).
ROBOT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$(?!\n)"
_ROBOT_ID = re.compile(ROBOT_ID_PATTERN)


def is_robot_id(text: str) -> bool:
    """Whether ``text`` is a whole robot id (or site name), nothing before or after."""
    return _ROBOT_ID.search(text) is not None


RobotId = Annotated[
    str,
    Meta(
        pattern=ROBOT_ID_PATTERN,
        description="1-64 characters: letters, digits and _ . : - (not first)",
    ),
]
Status = Literal["idle", "moving", "working", "charging", "error", "estop"]
STATUSES: tuple[Status, ...] = ("idle", "moving", "working", "charging", "error", "estop")

# Bounds that keep every number finite: JSON cannot spell NaN, but 1e999 decodes to inf.
Coordinate = Annotated[float, Meta(ge=-1e9, le=1e9, description="metres, finite")]
Angle = Annotated[float, Meta(ge=-1e6, le=1e6, description="radians, finite")]


class Pose(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Position on the site plane (m) and heading (rad)."""

    x: Coordinate
    y: Coordinate
    theta: Angle


class RobotReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    """One state report from one robot (wire contract v1)."""

    robot_id: RobotId
    boot: Annotated[int, Meta(ge=0, le=2**53, description="increases when the robot restarts")] = 0
    seq: Annotated[int, Meta(ge=0, le=2**53, description="increases with every report in a boot")]
    ts: Annotated[datetime, Meta(tz=True, description="event time, RFC 3339 with an offset")]
    status: Status
    battery: Annotated[float, Meta(ge=0.0, le=100.0, description="percent")]
    pose: Pose
    speed: Annotated[float, Meta(ge=0.0, le=1000.0, description="m/s")] = 0.0
    errors: Annotated[
        list[Annotated[str, Meta(max_length=64)]],
        Meta(max_length=16, description="at most 16, each at most 64 characters"),
    ] = msgspec.field(default_factory=list)
    site: Annotated[str, Meta(pattern=ROBOT_ID_PATTERN, description="fleet/site name")] | None = (
        None
    )

    @property
    def order(self) -> tuple[int, int]:
        """The report's place in the robot's history: ``(boot, seq)``."""
        return (self.boot, self.seq)


class LiveState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the product knows about one robot now.

    Times are on two clocks: ``status_since`` and the report's ``ts`` are the robot's
    own (event time); ``last_seen`` and ``updated`` are when reports *arrived* (Kafka
    append time), which no robot clock can move.
    """

    report: RobotReport  # the newest applied report
    last_seen: float  # arrival time (unix s) of the robot's newest report (any, even stale)
    online: bool  # a report arrived within FLEETPULSE_OFFLINE_AFTER_S
    status_since: datetime  # event time of the report that entered the current status
    # Reports in a row older in (boot, seq) than `report` (a robot reflashed or whose boot
    # counter went backwards reports "stale" forever; see FLEETPULSE_STUCK_AFTER).
    stale: int = 0
    resets: int = 0  # times an operator reset this robot's ordering (POST .../reset-order)
    reset_pending: bool = False  # reset, and no report since: the next one applies
    # Arrival-clock time of this change (the report's arrival, or the offline deadline);
    # with (resets, boot, seq) it orders a robot's changes, so replays change nothing.
    updated: float = 0.0


AlertKind = Literal[
    "low_battery",
    "battery_ok",
    "error",
    "estop",
    "offline",
    "back_online",
    "stuck",
    "order_reset",
]
ALERT_KINDS: tuple[AlertKind, ...] = (
    "low_battery",
    "battery_ok",
    "error",
    "estop",
    "offline",
    "back_online",
    "stuck",
    "order_reset",
)


class Alert(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A transition worth telling someone about; ``id`` is deterministic (idempotent writes)."""

    id: str
    robot_id: RobotId
    kind: AlertKind
    boot: int
    seq: int
    at: datetime  # event time of the report that raised it (arrival clock for offline)
    detail: str = ""


class WindowStats(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One closed 1-minute event-time window of one robot."""

    robot_id: RobotId
    window_start: datetime
    window_end: datetime
    count: int
    battery_min: float
    battery_avg: float
    battery_max: float
    distance_m: float
    max_speed: float
    error_count: int
    # 0, or which time the robot's clock went backwards (see dataflows.windows): a window
    # reopened after that is kept beside the earlier one of the same minute, not over it.
    part: int = 0


class TimeProblem(msgspec.Struct, frozen=True):
    """Why a report's ``ts`` is outside the accepted range: kind and a sentence."""

    kind: Literal["future", "past"]
    detail: str


def time_bounds_problem(
    ts: datetime, reference_s: float, max_future_s: float, max_age_s: float
) -> TimeProblem | None:
    """None when ``ts`` lies in ``[reference - max_age, reference + max_future]``.

    ``reference_s`` is the receiving clock (unix seconds): the server's at ingest, the
    Kafka append time in the dataflow. Works for any aware datetime of years 1-9999.
    """
    at = ts.timestamp()
    ahead = at - reference_s
    if ahead <= max_future_s and -ahead <= max_age_s:
        return None
    low = _iso(reference_s - max_age_s)
    high = _iso(reference_s + max_future_s)
    if ahead > 0:
        what = f"{ahead:,.0f} s ahead of the receiving clock"
        kind: Literal["future", "past"] = "future"
    else:
        what = f"{-ahead:,.0f} s behind the receiving clock"
        kind = "past"
    return TimeProblem(
        kind,
        f"ts {ts.isoformat()} is {what}; accepted: {low} to {high} (at most "
        f"FLEETPULSE_MAX_FUTURE_S={max_future_s:g} s ahead, FLEETPULSE_MAX_AGE_S="
        f"{max_age_s:g} s behind)",
    )


def _iso(unix_s: float) -> str:
    try:
        return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return "(out of range)"


_report_decoder = msgspec.json.Decoder(RobotReport)
_batch_decoder = msgspec.json.Decoder(list[RobotReport])
_encoder = msgspec.json.Encoder()

# JSON has one kind of number, and JSON Schema's `integer` (what the OpenAPI documents
# say of `boot` and `seq`) admits any number whose fraction is zero: 7.0 and 7e0 are the
# integer 7. msgspec's strict decoder refuses a float for an `int` field (its lax mode
# would also take "7", and a number for a datetime), so a body refused for exactly that is
# decoded again as the same Struct whose int fields also take a whole float within the
# same bounds (each occurrence of a repeated key still checked, as the strict decoder
# does), then made ints. The accepted path pays nothing for it.
_FLOAT_FOR_INT = "Expected `int`, got `float`"
_Lax = TypeVar("_Lax")


def _whole_floats(struct: type[msgspec.Struct]) -> tuple[type[msgspec.Struct], frozenset[str]]:
    """``struct`` with every bounded int field ``int | whole float`` (same bounds), and
    the names of those fields."""
    fields: list[tuple[str, object, object]] = []
    ints: set[str] = set()
    for f in msgspec.structs.fields(struct):
        kind: object = f.type
        if get_origin(kind) is Annotated and get_args(kind)[0] is int:
            bounds = [m for m in get_args(kind)[1:] if isinstance(m, Meta)]
            whole = Annotated[float, Meta(multiple_of=1), *bounds]
            kind = kind | whole
            ints.add(f.name)
        default = (
            msgspec.field(default_factory=f.default_factory)
            if f.default_factory is not msgspec.NODEFAULT
            else f.default
        )
        fields.append((f.name, kind, default))
    config = struct.__struct_config__
    lax = msgspec.defstruct(
        f"{struct.__name__}WholeFloats",
        [(n, k) if d is msgspec.NODEFAULT else (n, k, d) for n, k, d in fields],
        kw_only=True,
        forbid_unknown_fields=config.forbid_unknown_fields,
    )
    return lax, frozenset(ints)


_LaxReport, _INT_FIELDS = _whole_floats(RobotReport)
_lax_report_decoder = msgspec.json.Decoder(_LaxReport)
_lax_batch_decoder = msgspec.json.Decoder(list[_LaxReport])  # type: ignore[valid-type]


# What the second decoder says of an int field, in the strict decoder's words.
_AS_STRICT = {
    "Expected `float` that's a multiple of 1.0": _FLOAT_FOR_INT,
    "Expected `int | float`,": "Expected `int`,",
}


def _lax_decode(decoder: msgspec.json.Decoder[_Lax], data: bytes | str) -> _Lax:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        for lax, strict in _AS_STRICT.items():
            text = text.replace(lax, strict)
        raise msgspec.ValidationError(text) from None


def _from_lax(lax: msgspec.Struct) -> RobotReport:
    values = msgspec.structs.asdict(lax)
    for name in _INT_FIELDS:
        values[name] = int(values[name])
    return RobotReport(**values)


def decode_report(data: bytes | str) -> RobotReport:
    """Decode and validate one report; raises ``msgspec.ValidationError``/``DecodeError``.
    An integer may be written with a zero fraction (``"seq": 7.0``), as JSON Schema allows."""
    try:
        return _report_decoder.decode(data)
    except msgspec.ValidationError as exc:
        if _FLOAT_FOR_INT not in str(exc):
            raise
    return _from_lax(_lax_decode(_lax_report_decoder, data))


def decode_reports(data: bytes | str) -> list[RobotReport]:
    """Decode and validate a JSON array of reports (errors name the item's index)."""
    try:
        return _batch_decoder.decode(data)
    except msgspec.ValidationError as exc:
        if _FLOAT_FOR_INT not in str(exc):
            raise
    return [_from_lax(lax) for lax in _lax_decode(_lax_batch_decoder, data)]


def encode(obj: object) -> bytes:
    """Compact JSON for any of the schema's Structs."""
    return _encoder.encode(obj)
