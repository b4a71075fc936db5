"""Raw Kafka message -> a report the robot logic can take, or a dead letter saying why.

Pure (no I/O), so every way a message can be refused is unit-tested. Whatever reaches
the reports topic — from ingest or from any other producer — passes through here
before it can touch a robot's state: bad JSON or schema, a key that is not the
report's robot, and a ``ts`` outside the accepted range around the message's arrival
(the same range ingest enforces around its own clock) each become a dead letter of
their own kind.
"""

from __future__ import annotations

import msgspec

from dataflows.records import DeadKind, DeadLetter, Raw
from dataflows.rules import Rules
from dataflows.windows import window_fits
from fleetpulse.schema import RobotReport, decode_report, time_bounds_problem

__all__ = ["classify"]


def classify(raw: Raw, rules: Rules) -> RobotReport | DeadLetter:
    """Decode and check one message keyed by robot id (the key is already a robot id)."""
    robot, value, _traceparent, partition, offset, arrival_ms = raw
    try:
        report = decode_report(value or b"")
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return DeadLetter(
            robot.encode(), value, "invalid", f"invalid report: {exc}", partition, offset
        )
    if report.robot_id != robot:
        reason = f"key {robot!r} does not match robot_id {report.robot_id!r}"
        return DeadLetter(robot.encode(), value, "key", reason, partition, offset)
    problem = time_bounds_problem(report.ts, arrival_ms / 1000, rules.max_future_s, rules.max_age_s)
    if problem is not None:
        reason = problem.detail.replace("the receiving clock", "its Kafka append time")
        return DeadLetter(robot.encode(), value, problem.kind, reason, partition, offset)
    year = report.ts.year
    if (year < 2 or year > 9998) and not window_fits(report.ts, rules.window_s):
        # Only at the ends of the datetime range (an arrival clock in year 9999).
        kind: DeadKind = "future" if report.ts.year > 1 else "past"
        reason = f"ts {report.ts.isoformat()}: its window would lie outside years 1-9999 UTC"
        return DeadLetter(robot.encode(), value, kind, reason, partition, offset)
    return report
