"""What flows between the dataflow's steps; small, and cheap to pickle between workers."""

from __future__ import annotations

import msgspec

from dataflows.robot import Emits
from fleetpulse.schema import Alert, LiveState, WindowStats

__all__ = ["DLQ_KEY", "DeadLetter", "Out", "Raw"]

# The key of messages that cannot be keyed by robot; "!" never starts a robot id.
DLQ_KEY = "!dlq"

# One Kafka message before decoding:
# (robot id from the key, value, traceparent, partition, offset, append time ms).
Raw = tuple[str, bytes | None, str, int, int, int]


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """Something the flow could not use, bound for the DLQ topic with its origin."""

    key: bytes | None
    value: bytes | None
    reason: str
    partition: int
    offset: int
    late: bool = False  # a valid report, too late for its window (counted separately)

    @property
    def kind(self) -> str:
        """The metric label: late, key (no usable robot key), kafka (a consume error) or invalid."""
        if self.late:
            return "late"
        if self.reason.startswith("kafka error"):
            return "kafka"
        return "key" if self.reason.startswith(("message key", "key ")) else "invalid"


class Out(msgspec.Struct, kw_only=True, gc=False):
    """What one robot's step hands the sink: writes, dead letters, trace and timing."""

    states: list[LiveState] = msgspec.field(default_factory=list)
    alerts: list[Alert] = msgspec.field(default_factory=list)
    windows: list[WindowStats] = msgspec.field(default_factory=list)
    dead: list[DeadLetter] = msgspec.field(default_factory=list)
    traced: list[str] = msgspec.field(default_factory=list)  # process spans' traceparents
    appended_ms: list[int] = msgspec.field(default_factory=list)  # Kafka append times, applied
    applied: int = 0
    stale: int = 0
    duplicate: int = 0

    def merge(self, emits: Emits) -> None:
        """Add one pure step's output."""
        self.states += emits.states
        self.alerts += emits.alerts
        self.windows += emits.windows
        self.applied += emits.applied
        self.stale += emits.stale
        self.duplicate += emits.duplicate
