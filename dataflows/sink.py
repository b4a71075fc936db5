"""The dataflow's one sink: a batch of robot outputs -> one idempotent Redis write + Kafka.

Each worker writes what its own robots produced (no exchange before the sink). One
``write_batch`` call costs one Redis round trip (``state.RedisStateWriter``) and one
producer flush for alerts and dead letters, whose delivery is checked.

Tracing: for every sampled report whose state is in the batch, a ``redis write`` span
is made as a child of that report's ``process report`` span, covering the batch write.
Per-report child spans (rather than one batch span with links) keep the whole path of
a report in one trace; their volume is bounded by sampling: at 1M reports/s and
``FLEETPULSE_TRACE_SAMPLE_RATIO=0.001`` that is 1,000 traces/s of four spans each,
while unsampled reports cost no span at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from opentelemetry.trace import SpanKind

from dataflows.kafka_out import CheckedProducer, OutMessage
from dataflows.records import DeadLetter, Out
from fleetpulse.schema import Alert, LiveState, RobotReport, WindowStats, encode
from fleetpulse.settings import Settings
from observability.metrics import dataflow_metrics
from observability.tracing import context_from_traceparent, setup_tracing
from state.connect import connect
from state.writer import RedisStateWriter

__all__ = ["FleetSink", "process_id"]


def process_id() -> int:
    """This process's index in a Bytewax cluster (``-i`` / BYTEWAX_PROCESS_ID), 0 alone."""
    value = os.environ.get("BYTEWAX_PROCESS_ID")
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-i", "--process-id"):
            value = argv[i + 1]
    try:
        return int(value or 0)
    except ValueError:
        return 0


class FleetSink(DynamicSink[tuple[str, Out]]):
    """Writes the robots' outputs: state to Redis, alerts and dead letters to Kafka."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _FleetSinkPartition:
        return _FleetSinkPartition(self.settings, worker_index)


class _FleetSinkPartition(StatelessSinkPartition[tuple[str, Out]]):
    def __init__(self, settings: Settings, worker_index: int) -> None:
        self.settings = settings
        self.worker = worker_index
        self.writer = RedisStateWriter(connect(settings), settings)
        self.kafka = CheckedProducer(settings)
        self.tracer = setup_tracing(settings, "fleetpulse-dataflow").get_tracer("fleetpulse.sink")
        self.metrics = dataflow_metrics(
            settings.metrics_host, settings.dataflow_metrics_port, process_id()
        )

    def write_batch(self, items: list[tuple[str, Out]]) -> None:
        # A robot's many states in one batch coalesce into its newest (items arrive in
        # the order the robot's step emitted them); the reports applied on the way go
        # to its history, so a backlog costs one state write per robot, not per report.
        newest: dict[str, LiveState] = {}
        history: dict[str, list[RobotReport]] = {}
        appended: dict[str, int] = {}  # Kafka append time of each robot's newest report
        windows: list[WindowStats] = []
        alerts: list[Alert] = []
        dead: list[DeadLetter] = []
        traced: list[str] = []
        applied = stale = duplicate = 0
        for robot, out in items:
            if out.states:
                newest[robot] = out.states[-1]
                robot_history = history.setdefault(robot, [])
                for st in out.states:
                    if not robot_history or robot_history[-1].order != st.report.order:
                        robot_history.append(st.report)
            if out.appended_ms:
                appended[robot] = out.appended_ms[-1]
            windows += out.windows
            alerts += out.alerts
            dead += out.dead
            traced += out.traced
            applied += out.applied
            stale += out.stale
            duplicate += out.duplicate
        states = list(newest.values())
        m = self.metrics
        if states or windows or alerts:
            started_ns = time.time_ns()
            result = self.writer.write(states, windows, alerts, history)
            ended_ns = time.time_ns()
            m.writes.inc()
            # Freshness of what became visible: each robot's newest applied report.
            written_ms = ended_ns // 1_000_000
            for append_ms in appended.values():
                if append_ms > 0:
                    m.freshness.observe(max(0, written_ms - append_ms) / 1000)
            self._trace_writes(traced, started_ns, ended_ns, len(states), result.states_applied)
        m.applied.inc(applied)
        m.stale.inc(stale)
        m.duplicate.inc(duplicate)
        self.kafka.send(self._kafka_messages(alerts, dead))
        for a in alerts:
            m.alerts.labels(a.kind).inc()
        for d in dead:
            m.dead.labels(d.kind).inc()

    def _trace_writes(
        self, traced: list[str], start_ns: int, end_ns: int, batch: int, applied: int
    ) -> None:
        for traceparent in traced:
            parent = context_from_traceparent(traceparent)
            if parent is None:
                continue
            span = self.tracer.start_span(
                "redis write",
                context=parent,
                kind=SpanKind.CLIENT,
                start_time=start_ns,
                attributes={
                    "db.system": "redis",
                    "db.operation": "EVALSHA",
                    "fleetpulse.batch.states": batch,
                    "fleetpulse.batch.applied": applied,
                },
            )
            span.end(end_time=end_ns)

    def _kafka_messages(self, alerts: list[Alert], dead: list[DeadLetter]) -> list[OutMessage]:
        s = self.settings
        msgs: list[OutMessage] = [
            (s.topic_alerts, a.robot_id.encode(), encode(a), [("alert_id", a.id.encode())])
            for a in alerts
        ]
        for d in dead:
            headers: list[tuple[str, Any]] = [
                ("reason", d.reason.encode()[:1000]),
                ("source_topic", s.topic_reports.encode()),
                ("source_partition", str(d.partition).encode()),
                ("source_offset", str(d.offset).encode()),
            ]
            msgs.append((s.topic_dlq, d.key, d.value or b"", headers))
        return msgs

    def close(self) -> None:
        self.kafka.close()
