"""Control records: an operator's command for one robot, sent down the reports topic.

A control record travels in the robot's own partition (key = robot id), so the
dataflow meets it in order with the robot's reports: everything before it was
applied under the old rules, everything after it under the new. It is told apart
from a report by its header, never by trying to decode the value:

    header  fleetpulse_control = b"reset_order"      (CONTROL_HEADER, RESET_ORDER; RETIRE, ACK)
    key     the robot id
    value   {"control": "reset_order", "robot_id": "amr-7",
             "by": "<first 12 hex of the token's SHA-256>",
             "requested_at": "2026-11-30T09:43:55.123Z"}

Kinds: ``reset_order`` (forget the robot's newest ``(boot, seq)``), ``retire`` (forget
the robot: its state in the dataflow, and in Redis its keys, index entries and summary
counts) and ``ack`` (an operator acknowledged the robot's open incident ``incident``).
Written by ingest (``POST /v1/robots/{robot_id}/reset-order``, ``.../retire`` and
``POST /v1/incidents/{id}/ack``, admin scope), read by the dataflow. This module is the
one definition of the format; the value is a contract kept in Kafka for the topic's
retention, so a new field must come with a default (old records still decode) and a new
kind of control is a new ``control`` value, which an older reader must send to the DLQ
rather than guess at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from fleetpulse.schema import RobotId

__all__ = [
    "ACK",
    "CONTROL_HEADER",
    "INCIDENT_ID_PATTERN",
    "RESET_ORDER",
    "RETIRE",
    "Control",
    "ControlKind",
    "ack",
    "control_kind",
    "decode_control",
    "encode_control",
    "reset_order",
    "retire",
]

CONTROL_HEADER = "fleetpulse_control"
RESET_ORDER = b"reset_order"
RETIRE = b"retire"
ACK = b"ack"

ControlKind = Literal["reset_order", "retire", "ack"]

# An incident id: "<robot>:<rule>:<boot>:<seq>" (fleetpulse.alert_rules.Incident).
INCIDENT_ID_PATTERN = (
    r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}:[a-z0-9][a-z0-9_.-]{0,63}:[0-9]{1,16}:[0-9]{1,16}$(?!\n)"
)


class Control(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One operator command for one robot (the value of a control record)."""

    control: ControlKind
    robot_id: RobotId
    # Who asked: the first 12 hex characters of the SHA-256 of the admin's token (never
    # the token); the same fingerprint is in the ingest server's audit log.
    by: Annotated[str, Meta(pattern=r"^[0-9a-f]{12}$")]
    requested_at: Annotated[datetime, Meta(tz=True)]  # the ingest server's clock, UTC
    # ack: the incident acknowledged (one of the robot's); "" for the other kinds.
    incident: Annotated[str, Meta(max_length=200)] = ""


def reset_order(robot_id: str, by: str, now: datetime | None = None) -> Control:
    """A ``reset_order`` command: forget the robot's newest ``(boot, seq)`` so that its
    next report applies whatever its order (for a robot whose counters went backwards)."""
    return _command("reset_order", robot_id, by, now)


def retire(robot_id: str, by: str, now: datetime | None = None) -> Control:
    """A ``retire`` command: forget the robot everywhere (a report of it later makes it
    a new robot)."""
    return _command("retire", robot_id, by, now)


def ack(robot_id: str, incident: str, by: str, now: datetime | None = None) -> Control:
    """An ``ack`` command: an operator acknowledged the robot's open ``incident``."""
    return _command("ack", robot_id, by, now, incident)


def _command(
    kind: ControlKind, robot_id: str, by: str, now: datetime | None, incident: str = ""
) -> Control:
    at = (now or datetime.now(UTC)).astimezone(UTC)
    return Control(control=kind, robot_id=robot_id, by=by, requested_at=at, incident=incident)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Control)


def encode_control(control: Control) -> bytes:
    """The record value: compact JSON, ``requested_at`` in RFC 3339 UTC (``...Z``)."""
    return _encoder.encode(control)


def decode_control(data: bytes | str) -> Control:
    """Decode and validate a record value; raises ``msgspec.ValidationError``/``DecodeError``."""
    return _decoder.decode(data)


def control_kind(
    headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None,
) -> bytes | None:
    """The value of the ``fleetpulse_control`` header (e.g. ``b"reset_order"``), or None
    for a message without it: a report."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, value in pairs:
        if name == CONTROL_HEADER:
            return value.encode() if isinstance(value, str) else value or b""
    return None
