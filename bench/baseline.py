"""The raw baseline: the fleet job as one hand-written loop, no stream framework.

    python -m bench.baseline   (reads FLEETPULSE_* settings; stops at the end of the topic)

confluent-kafka consume -> msgspec decode -> per-robot ``(boot, seq)`` ordering, live
state and windows (the very same pure functions as the dataflow) -> one coalesced,
idempotent Redis batch per poll through ``state.RedisStateWriter``. It is the floor
any framework pays its own costs on top of: no exchange between workers, no
snapshots, no per-item operator calls.
"""

from __future__ import annotations

import sys
import time
import uuid

import msgspec
from confluent_kafka import Consumer, TopicPartition

from dataflows.robot import RobotState, on_report
from dataflows.rules import Rules
from fleetpulse.kafka_config import kafka_config
from fleetpulse.schema import Alert, LiveState, WindowStats, decode_report
from fleetpulse.settings import Settings, load_settings
from state.connect import connect
from state.writer import RedisStateWriter, coalesce

__all__ = ["run"]


def run(settings: Settings, batch: int = 2000) -> int:
    """Consume the reports topic from the start to its end; returns reports processed."""
    rules = Rules.from_settings(settings)
    writer = RedisStateWriter(connect(settings), settings)
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"baseline-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            },
        )
    )
    meta = consumer.list_topics(settings.topic_reports, timeout=10)
    parts = list(meta.topics[settings.topic_reports].partitions)
    consumer.assign([TopicPartition(settings.topic_reports, p, 0) for p in parts])
    robots: dict[str, RobotState] = {}
    at_end: set[int] = set()
    seen = 0
    try:
        while len(at_end) < len(parts):
            msgs = consumer.consume(batch, 0.1)
            changes: list[LiveState] = []
            windows: list[WindowStats] = []
            alerts: list[Alert] = []
            for msg in msgs:
                if msg.error() is not None:
                    at_end.add(msg.partition() or 0)
                    continue
                seen += 1
                try:
                    report = decode_report(msg.value() or b"")
                except msgspec.MsgspecError:
                    continue
                arrival = msg.timestamp()[1] / 1000
                state, emits = on_report(
                    robots.get(report.robot_id), report, arrival, msg.partition() or 0, rules
                )
                robots[report.robot_id] = state
                changes += emits.states
                windows += emits.windows
                alerts += emits.alerts
            if changes or windows or alerts:
                newest, history = coalesce(changes)
                writer.write(newest, windows, alerts, history)
    finally:
        consumer.close()
    return seen


def main() -> int:
    settings = load_settings()
    started = time.monotonic()
    n = run(settings)
    took = time.monotonic() - started
    print(f"baseline: {n} reports in {took:.2f}s = {n / took:.0f} reports/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
