"""What flows between the dataflow's steps; small, and cheap to pickle between workers.

The source emits, keyed by shard (``dataflows.shard.shard_key``):

* :data:`Raw` — one Kafka message, value still bytes (decoded inside the shard step),
* :data:`Progress` — "every message of Kafka partition p appended at or before t has
  been read": the arrival clock that offline detection and window closing run on,
* :class:`Control` — an operator's command for one robot, ordered with its reports,
* :class:`DeadLetter` — a message that cannot be keyed (under :data:`DLQ_KEY`),
* :class:`Republish` — "write every robot's live state again" (``dataflows.republish``).

The shard step hands the sink one :class:`Out` per call; a robot it forgot (an admin's
``retire``, or silence longer than ``FLEETPULSE_RETIRE_AFTER_S``) is a :class:`Retired`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from fleetpulse.alert_rules import Incident
from fleetpulse.control import ControlKind
from fleetpulse.schema import Alert, LiveState, WindowStats

__all__ = [
    "DLQ_KEY",
    "Control",
    "DeadKind",
    "DeadLetter",
    "Out",
    "Progress",
    "Raw",
    "Republish",
    "Retired",
]

# The key of messages that cannot be keyed by robot; "!" never starts a shard key.
DLQ_KEY = "!dlq"

# One Kafka message before decoding:
# (robot id from the key, value, traceparent, partition, offset, arrival ms).
# A plain tuple: one is built per message and pickled between workers.
Raw = tuple[str, bytes | None, str, int, int, int]

# (partition, progress ms): the partition has been read up to that arrival time.
Progress = tuple[int, int]

# Why a message went to the DLQ, set where the dead letter is made (never parsed back
# out of the reason text): a malformed report, a key that is not (or does not match) the
# robot id, a valid report too late for its window, a ts too far ahead of or behind its
# arrival, an exception in the per-robot logic, a new robot beyond FLEETPULSE_MAX_ROBOTS.
DeadKind = Literal["invalid", "key", "late", "future", "past", "error", "limit"]


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """Something the flow could not use, bound for the DLQ topic with its origin."""

    key: bytes | None
    value: bytes | None
    kind: DeadKind
    reason: str  # for people: what was wrong, with the exception text for `error`
    partition: int
    offset: int


class Control(msgspec.Struct, frozen=True, gc=False):
    """An operator's command for one robot, read from the reports topic (key = robot)."""

    robot_id: str
    action: ControlKind
    by: str  # who asked (a token fingerprint), for the audit trail
    partition: int
    offset: int
    arrival_ms: int
    incident: str = ""  # ack: the incident acknowledged


class Republish(msgspec.Struct, frozen=True, gc=False):
    """Every shard writes all its robots' live state again, once per token."""

    token: str


class Retired(msgspec.Struct, frozen=True, gc=False):
    """A robot the shard forgot: Redis drops its keys, index entries and summary counts.

    ``states``, ``alerts``, ``windows`` and ``incidents`` say how many items of the same
    :class:`Out`
    came before the retirement: the robot's among them are not written to Redis (they
    would bring it back); its items after them belong to its next life.
    """

    robot_id: str
    at_ms: int  # arrival clock: the retire record's append time, or the progress mark
    why: Literal["admin", "retention"]
    by: str  # the admin's token fingerprint; "" for retention
    states: int
    alerts: int
    windows: int
    incidents: int


class Out(msgspec.Struct, kw_only=True, gc=False):
    """What one shard step hands the sink: writes, dead letters, trace and timing."""

    states: list[LiveState] = msgspec.field(default_factory=list)  # in each robot's order
    alerts: list[Alert] = msgspec.field(default_factory=list)
    windows: list[WindowStats] = msgspec.field(default_factory=list)
    incidents: list[Incident] = msgspec.field(default_factory=list)  # opened or closed
    dead: list[DeadLetter] = msgspec.field(default_factory=list)
    # (trace id, span id) of the `process report` span of each traced report with a state.
    traced: list[tuple[int, int]] = msgspec.field(default_factory=list)
    appended_ms: dict[str, int] = msgspec.field(default_factory=dict)  # robot -> newest applied
    applied: int = 0
    stale: int = 0
    duplicate: int = 0
    errors: int = 0  # exceptions contained (each also a dead letter of kind `error`)
    republished: str = ""  # the Republish token whose states this Out carries
    retired: list[Retired] = msgspec.field(default_factory=list)  # in the order they happened

    def __bool__(self) -> bool:
        return bool(
            self.states or self.alerts or self.windows or self.dead or self.applied
            or self.incidents
            or self.stale or self.duplicate or self.republished or self.retired
        )  # fmt: skip

    def retire(
        self, robot_id: str, at_ms: int, why: Literal["admin", "retention"], by: str
    ) -> None:
        """Note that ``robot_id`` was forgotten after everything this Out holds so far."""
        self.retired.append(
            Retired(
                robot_id,
                at_ms,
                why,
                by,
                len(self.states),
                len(self.alerts),
                len(self.windows),
                len(self.incidents),
            )
        )
