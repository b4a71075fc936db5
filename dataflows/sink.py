"""The dataflow's one sink: a batch of shard outputs -> one idempotent Redis write + Kafka.

Each worker writes what its own shards produced (no exchange before the sink). One
``write_batch`` call costs one Redis round trip (``state.RedisStateWriter``) and one
producer flush for alerts and dead letters, whose delivery is checked.

Outages stall, they do not crash: a Redis or Kafka write that fails is retried with
back-off (every write is idempotent, so a retry is safe), and the flow waits meanwhile.
Because offline detection runs on the arrival clock, a stall raises no false alerts.

Tracing: for every sampled report whose state is in the batch, a ``redis write`` span
is made as a child of that report's ``process report`` span, covering the batch write.
Per-report child spans (rather than one batch span with links) keep the whole path of
a report in one trace; their volume is bounded by sampling: at 1M reports/s and
``FLEETPULSE_TRACE_SAMPLE_RATIO=0.001`` that is 1,000 traces/s of four spans each,
while unsampled reports cost no span at all.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from opentelemetry.trace import SpanKind

from dataflows.chaos import Chaos
from dataflows.kafka_out import CheckedProducer, DeliveryFailed, OutMessage
from dataflows.records import DeadLetter, Out, Retired
from dataflows.spans import SpanIds, flow_spans
from fleetpulse.alert_rules import Incident
from fleetpulse.schema import Alert, LiveState, WindowStats, encode
from fleetpulse.settings import Settings
from observability.metrics import dataflow_metrics
from state.connect import connect
from state.projection import Projection
from state.writer import RedisStateWriter, WriteResult, coalesce

log = logging.getLogger("fleetpulse.dataflow.sink")

T = TypeVar("T")

# Redis errors that pass (a restart, a failover, a network blip); others are bugs.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

__all__ = ["FleetSink", "metrics_offset", "process_id"]


def process_id() -> int:
    """This process's index in a Bytewax cluster, 0 alone: ``-i``, BYTEWAX_PROCESS_ID, or
    (as ``bytewax.run`` does in the Bytewax chart's StatefulSet) the pod's ordinal, from
    BYTEWAX_POD_NAME less BYTEWAX_STATEFULSET_NAME + "-"."""
    value = os.environ.get("BYTEWAX_PROCESS_ID")
    pod, statefulset = (
        os.environ.get("BYTEWAX_POD_NAME"),
        os.environ.get("BYTEWAX_STATEFULSET_NAME"),
    )
    if value is None and pod and statefulset and pod.startswith(statefulset + "-"):
        value = pod[len(statefulset) + 1 :]
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-i", "--process-id"):
            value = argv[i + 1]
    try:
        return int(value or 0)
    except ValueError:
        return 0


def metrics_offset(settings: Settings) -> int:
    """Added to FLEETPULSE_DATAFLOW_METRICS_PORT: this process's index where processes
    share a host, 0 where each has its own address (``metrics_port_per_process`` off)."""
    return process_id() if settings.metrics_port_per_process else 0


class FleetSink(DynamicSink[tuple[str, Out]]):
    """Writes the shards' outputs: state to Redis, alerts and dead letters to Kafka."""

    def __init__(self, settings: Settings, chaos: Chaos | None = None) -> None:
        self.settings = settings
        self.chaos = chaos or Chaos({})

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _FleetSinkPartition:
        return _FleetSinkPartition(self.settings, worker_index, self.chaos)


def _after_retirements(
    out: Out,
) -> tuple[list[LiveState], list[WindowStats], list[Alert], list[Incident]]:
    """``out``'s states, windows, alerts and incidents less those of a robot from before
    its retirement in the same Out (each :class:`Retired` says how many items preceded
    it)."""
    cut: dict[str, Retired] = {}
    for r in out.retired:
        cut[r.robot_id] = r  # the last retirement of a robot covers the earlier ones

    def kept(robot: str, i: int, field: str) -> bool:
        r = cut.get(robot)
        return r is None or i >= getattr(r, field)

    states = [st for i, st in enumerate(out.states) if kept(st.report.robot_id, i, "states")]
    windows = [w for i, w in enumerate(out.windows) if kept(w.robot_id, i, "windows")]
    alerts = [a for i, a in enumerate(out.alerts) if kept(a.robot_id, i, "alerts")]
    incidents = [x for i, x in enumerate(out.incidents) if kept(x.robot_id, i, "incidents")]
    return states, windows, alerts, incidents


def _retry(what: str, call: Callable[[], T], transient: tuple[type[Exception], ...]) -> T:
    """``call()`` until it succeeds; transient failures wait (0.1 s doubling to 5 s)."""
    delay, failures = 0.1, 0
    while True:
        try:
            return call()
        except transient as exc:
            if isinstance(exc, redis.AuthenticationError):
                raise  # refused credentials do not pass by waiting (FLEETPULSE_REDIS_USERNAME)
            failures += 1
            if failures == 1 or failures % 20 == 0:
                log.warning("%s failed (%s); retrying (attempt %d)", what, exc, failures + 1)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _FleetSinkPartition(StatelessSinkPartition[tuple[str, Out]]):
    def __init__(self, settings: Settings, worker_index: int, chaos: Chaos) -> None:
        self.settings = settings
        self.worker = worker_index
        self.after_redis = chaos.point("sink")
        client = connect(settings)
        self.writer = _retry(
            "connecting to Redis", lambda: RedisStateWriter(client, settings), _TRANSIENT
        )
        self.projection = Projection(client, settings.redis_prefix)
        self.kafka = CheckedProducer(settings)
        self.spans = flow_spans(settings)
        self.metrics = dataflow_metrics(
            settings.metrics_host, settings.dataflow_metrics_port, metrics_offset(settings)
        )

    def write_batch(self, items: list[tuple[str, Out]]) -> None:
        # A robot's many states in one batch coalesce into its newest (each robot's
        # states arrive in the order its shard emitted them); the reports applied on the
        # way go to its history, so a backlog costs one state write per robot.
        windows: list[WindowStats] = []
        alerts: list[Alert] = []
        dead: list[DeadLetter] = []
        traced: list[SpanIds] = []
        appended: dict[str, int] = {}  # Kafka append time of each robot's newest report
        republished: dict[str, list[str]] = {}  # re-publish token -> shards that answered
        applied = stale = duplicate = errors = republished_states = 0
        all_states: list[LiveState] = []
        to_redis: list[Alert] = []  # alerts go to Kafka all, to Redis unless retired after
        incidents: list[Incident] = []  # the same for incidents
        incidents_to_redis: list[Incident] = []
        retired: list[Retired] = []
        for shard, out in items:
            if out.republished:
                republished.setdefault(out.republished, []).append(shard)
                republished_states += len(out.states)
            appended.update(out.appended_ms)
            out_states, out_windows, out_alerts = out.states, out.windows, out.alerts
            if out.retired:
                # What the robot did before its retirement must not bring it back.
                gone = {r.robot_id for r in out.retired}
                all_states = [st for st in all_states if st.report.robot_id not in gone]
                windows = [w for w in windows if w.robot_id not in gone]
                to_redis = [a for a in to_redis if a.robot_id not in gone]
                incidents_to_redis = [i for i in incidents_to_redis if i.robot_id not in gone]
                for robot in gone:
                    appended.pop(robot, None)
                out_states, out_windows, out_alerts, out_incidents = _after_retirements(out)
                retired += out.retired
            else:
                out_incidents = out.incidents
            all_states += out_states
            windows += out_windows
            to_redis += out_alerts
            incidents_to_redis += out_incidents
            alerts += out.alerts
            incidents += out.incidents
            dead += out.dead
            traced += out.traced
            applied += out.applied
            stale += out.stale
            duplicate += out.duplicate
            errors += out.errors
        states, history = coalesce(all_states)
        m = self.metrics
        if states or windows or to_redis or retired or incidents_to_redis:
            started_ns = time.time_ns()
            forgot = [(r.robot_id, r.at_ms) for r in retired]
            result: WriteResult = _retry(
                "writing to Redis",
                lambda: self.writer.write(
                    states, windows, to_redis, history, forgot, incidents_to_redis
                ),
                _TRANSIENT,
            )
            for r in retired:
                m.retired.labels(r.why).inc()
            ended_ns = time.time_ns()
            m.writes.inc()
            # Freshness of what became visible: each robot's newest applied report.
            written_ms = ended_ns // 1_000_000
            for append_ms in appended.values():
                if append_ms > 0:
                    m.freshness.observe(max(0, written_ms - append_ms) / 1000)
            self._trace_writes(traced, started_ns, ended_ns, len(states), result.states_applied)
            if self.after_redis is not None:
                self.after_redis()  # chaos: die between the Redis write and Kafka
        if republished:
            m.republished.inc(republished_states)
            self._record_republish(republished)
        m.applied.inc(applied)
        m.stale.inc(stale)
        m.duplicate.inc(duplicate)
        m.errors.inc(errors)
        messages = self._kafka_messages(alerts, dead, incidents)
        if messages:
            _retry(
                "sending alerts, incidents and dead letters to Kafka",
                lambda: self.kafka.send(messages),
                (DeliveryFailed,),
            )
        for a in alerts:
            m.alerts.labels(a.kind).inc()
        for i in incidents:
            m.incidents.labels(i.severity, i.state).inc()
        for d in dead:
            m.dead.labels(d.kind).inc()

    def _record_republish(self, republished: dict[str, list[str]]) -> None:
        """After their states are written: note the shards that re-published; the sink
        that completes a token marks the projection whole again (state.projection)."""
        for token, shards in republished.items():
            done = _retry(
                "recording the re-published shards",
                lambda: self.projection.shards_written(token, shards, self.settings.shards),  # noqa: B023 - called at once
                _TRANSIENT,
            )
            if done:
                self.metrics.republishes.labels("completed").inc()
                log.warning(
                    "re-publish %s complete: every shard's live state is in Redis again", token
                )

    def _trace_writes(
        self, traced: list[SpanIds], start_ns: int, end_ns: int, batch: int, applied: int
    ) -> None:
        attributes: dict[str, str | int | bool] = {
            "db.system": "redis",
            "fleetpulse.batch.states": batch,
            "fleetpulse.batch.applied": applied,
        }
        for parent in traced:
            self.spans.record("redis write", parent, start_ns, end_ns, attributes, SpanKind.CLIENT)

    def _kafka_messages(
        self, alerts: list[Alert], dead: list[DeadLetter], incidents: list[Incident]
    ) -> list[OutMessage]:
        s = self.settings
        msgs: list[OutMessage] = [
            (s.topic_alerts, a.robot_id.encode(), encode(a), [("alert_id", a.id.encode())])
            for a in alerts
        ]
        msgs += [
            (
                s.topic_incidents,
                i.robot_id.encode(),
                encode(i),
                [("incident_id", i.id.encode()), ("rank", str(i.rank).encode())],
            )
            for i in incidents
        ]
        for d in dead:
            headers: list[tuple[str, Any]] = [
                ("kind", d.kind.encode()),
                ("reason", d.reason.encode()[:1000]),
                ("source_topic", s.topic_reports.encode()),
                ("source_partition", str(d.partition).encode()),
                ("source_offset", str(d.offset).encode()),
            ]
            msgs.append((s.topic_dlq, d.key, d.value or b"", headers))
        return msgs

    def close(self) -> None:
        self.kafka.close()
