"""The one schema library: msgspec Structs for the wire, Kafka values, state and API.

``RobotReport`` is wire contract v1 (DESIGN.md, "Wire contract"): unknown fields are
rejected, every number is bounded (so NaN and Infinity can never pass), and the
order of reports for one robot is ``(boot, seq)`` — clocks are never trusted for order.

Decoders and encoders are built once here and shared by ingest, dataflow and API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

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
]

ROBOT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"

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


class Pose(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Position on the site plane (m) and heading (rad)."""

    x: Coordinate
    y: Coordinate
    theta: Angle


class RobotReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
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


class LiveState(msgspec.Struct, frozen=True, kw_only=True):
    """What the product knows about one robot now."""

    report: RobotReport  # the newest applied report
    last_seen: float  # processing time (unix seconds) the newest report was applied
    online: bool
    status_since: datetime  # event time of the report that entered the current status


AlertKind = Literal["low_battery", "battery_ok", "error", "estop", "offline", "back_online"]
ALERT_KINDS: tuple[AlertKind, ...] = (
    "low_battery",
    "battery_ok",
    "error",
    "estop",
    "offline",
    "back_online",
)


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """A transition worth telling someone about; ``id`` is deterministic (idempotent writes)."""

    id: str
    robot_id: RobotId
    kind: AlertKind
    boot: int
    seq: int
    at: datetime  # event time of the report that raised it (processing time for offline)
    detail: str = ""


class WindowStats(msgspec.Struct, frozen=True, kw_only=True):
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


_report_decoder = msgspec.json.Decoder(RobotReport)
_batch_decoder = msgspec.json.Decoder(list[RobotReport])
_encoder = msgspec.json.Encoder()


def decode_report(data: bytes | str) -> RobotReport:
    """Decode and validate one report; raises ``msgspec.ValidationError``/``DecodeError``."""
    return _report_decoder.decode(data)


def decode_reports(data: bytes | str) -> list[RobotReport]:
    """Decode and validate a JSON array of reports (errors name the item's index)."""
    return _batch_decoder.decode(data)


def encode(obj: object) -> bytes:
    """Compact JSON for any of the schema's Structs."""
    return _encoder.encode(obj)
