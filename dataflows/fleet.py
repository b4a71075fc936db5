"""The fleet dataflow: Kafka reports -> per-robot live state, windows, alerts -> Redis.

    python -m bytewax.run "dataflows.fleet:build_flow()"                 one process
    python -m bytewax.run "dataflows.fleet:build_flow()" -w 2            two workers
    python -m bytewax.run "dataflows.fleet:build_flow()" -i 0 -a "127.0.0.1:2101;127.0.0.1:2102"
                                                                          process 0 of 2

Recovery is on by default: started through ``bytewax.run`` without recovery flags,
the flow creates its recovery partitions in ``FLEETPULSE_RECOVERY_DIR`` (first run
only) and restarts the same command with them, snapshotting every
``FLEETPULSE_SNAPSHOT_INTERVAL_S``. Without recovery (``FLEETPULSE_RECOVERY_DIR=``),
Bytewax keeps no offsets and re-reads the topic from the beginning on every restart.

Shape (DESIGN.md, "Dataflow semantics"):

    ReportSource (Kafka): key by the message key, keep raw bytes ──▶
    stateful_batch (per robot): decode, order by (boot, seq), live state, alerts,
        offline timers, 1-minute event-time windows; bad data -> dead letters ──▶
    FleetSink: one idempotent Redis batch (state/), alerts and dead letters to Kafka

Items cross between workers as raw bytes and are decoded inside the keyed step:
pickling decoded Structs between processes costs more than decoding them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.recovery import init_db_dir
from opentelemetry import trace

from dataflows.records import DeadLetter, Out, Raw
from dataflows.robot import RobotState, next_wakeup, on_report, on_restore, on_tick
from dataflows.rules import Rules
from dataflows.sink import FleetSink, process_id
from dataflows.source import ReportSource
from fleetpulse.schema import decode_report
from fleetpulse.settings import Settings, load_settings
from observability.logs import setup_logging
from observability.metrics import dataflow_metrics
from observability.tracing import context_from_traceparent, setup_tracing, traceparent_header

__all__ = ["build_flow"]

log = logging.getLogger("fleetpulse.dataflow")

_STATE_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(RobotState)


def _sampled(traceparent: str) -> bool:
    """Whether a W3C traceparent's flags say "sampled" (bit 0); unsampled costs no span."""
    try:
        return len(traceparent) == 55 and bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return False


class RobotLogic(StatefulBatchLogic[Raw | DeadLetter, Out, bytes]):
    """One robot's state in Bytewax: the pure logic of ``dataflows.robot`` plus I/O glue."""

    def __init__(self, rules: Rules, tracer: trace.Tracer, resume: bytes | None):
        self.rules = rules
        self.tracer = tracer
        self.state: RobotState | None = None
        if resume is not None:
            # After a restart: online robots get a fresh grace period, not an offline storm.
            self.state = on_restore(_STATE_DECODER.decode(resume), time.time(), rules)

    def on_batch(self, values: list[Raw | DeadLetter]) -> tuple[list[Out], bool]:
        now = time.time()
        out = Out()
        for raw in values:
            if isinstance(raw, DeadLetter):
                out.dead.append(raw)
                continue
            self._apply(raw, now, out)
        return [out], self.RETAIN if self.state is not None else self.DISCARD

    def _apply(self, raw: Raw, now: float, out: Out) -> None:
        robot, value, traceparent, partition, offset, append_ms = raw
        try:
            report = decode_report(value or b"")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reason = f"invalid report: {exc}"
            out.dead.append(DeadLetter(robot.encode(), value, reason, partition, offset))
            return
        if report.robot_id != robot:
            reason = f"key {robot!r} does not match robot_id {report.robot_id!r}"
            out.dead.append(DeadLetter(robot.encode(), value, reason, partition, offset))
            return
        parent = context_from_traceparent(traceparent) if _sampled(traceparent) else None
        if parent is None:
            self.state, emits = on_report(self.state, report, now, self.rules)
        else:
            with self.tracer.start_as_current_span(
                "process report",
                context=parent,
                attributes={
                    "robot_id": report.robot_id,
                    "boot": report.boot,
                    "seq": report.seq,
                    "messaging.kafka.partition": partition,
                    "messaging.kafka.offset": offset,
                },
            ) as span:
                self.state, emits = on_report(self.state, report, now, self.rules)
                span.set_attribute("applied", emits.applied > 0)
                carried = traceparent_header(span)
                if carried is not None and emits.states:
                    out.traced.append(carried.decode())
        if emits.applied:
            out.appended_ms.append(append_ms)
        for late in emits.late:
            out.dead.append(
                DeadLetter(
                    robot.encode(),
                    value,
                    f"late: event time {late.ts.isoformat()} is behind the closed window",
                    partition,
                    offset,
                    late=True,
                )
            )
        out.merge(emits)

    def on_notify(self) -> tuple[list[Out], bool]:
        if self.state is None:
            return [], self.DISCARD
        self.state, emits = on_tick(self.state, time.time(), self.rules)
        out = Out()
        out.merge(emits)
        return [out], self.RETAIN

    def notify_at(self) -> datetime | None:
        when = next_wakeup(self.state) if self.state is not None else None
        return datetime.fromtimestamp(when, UTC) if when is not None else None

    def snapshot(self) -> bytes:
        # Encoded bytes are an immutable copy, whatever the step does to the state next.
        return _STATE_ENCODER.encode(self.state)


def build_flow(settings: Settings | None = None, *, tail: bool = True) -> Dataflow:
    """The fleet dataflow. With no settings, they are loaded from the environment.

    ``tail=False`` stops at the end of the topic (tests, replays); the default keeps
    waiting for new reports.
    """
    if settings is None:  # the entry point: python -m bytewax.run "...:build_flow()"
        settings = load_settings()
        setup_logging(settings, "fleetpulse-dataflow")
    _recovery_on_by_default(settings)
    rules = Rules.from_settings(settings)
    metrics = dataflow_metrics(settings.metrics_host, settings.dataflow_metrics_port, process_id())
    flow = Dataflow("fleetpulse")
    # Items arrive keyed by robot (the Kafka key), values still raw bytes.
    keyed = op.input("reports", flow, ReportSource(settings, metrics, tail=tail))

    # One tracer for every robot's logic (a logic object exists per robot key).
    tracer = setup_tracing(settings, "fleetpulse-dataflow").get_tracer("fleetpulse.flow")

    def builder(resume: bytes | None) -> RobotLogic:
        return RobotLogic(rules, tracer, resume)

    robots = op.stateful_batch("robots", keyed, builder)
    op.output("sink", robots, FleetSink(settings))
    return flow


def _recovery_on_by_default(settings: Settings) -> None:
    """Under ``python -m bytewax.run`` without recovery flags, restart with recovery on."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is None or main_spec.name != "bytewax.run":
        return  # built by tests or another runner, which choose their own recovery
    directory = os.environ.get("BYTEWAX_RECOVERY_DIRECTORY") or _flag(
        ("-r", "--recovery-directory")
    )
    if directory:
        _init_partitions(Path(directory), settings.recovery_partitions)
        return
    if not settings.recovery_dir:
        log.warning(
            "recovery is off (FLEETPULSE_RECOVERY_DIR is empty): every restart re-reads "
            "%s from the beginning",
            settings.topic_reports,
        )
        return
    recovery = Path(settings.recovery_dir).resolve()
    _init_partitions(recovery, settings.recovery_partitions)
    env = {
        **os.environ,
        "BYTEWAX_RECOVERY_DIRECTORY": str(recovery),
        "BYTEWAX_SNAPSHOT_INTERVAL": f"{settings.snapshot_interval_s:g}",
        "BYTEWAX_RECOVERY_BACKUP_INTERVAL": f"{settings.backup_interval_s:g}",
    }
    print(f"fleetpulse: recovery on, partitions in {recovery}", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "bytewax.run", *sys.argv[1:]], env)


def _flag(names: tuple[str, ...]) -> str | None:
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _init_partitions(directory: Path, count: int) -> None:
    """Create the recovery partitions once; concurrent processes of a cluster wait their turn."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any(directory.glob("part-*")):
            init_db_dir(directory, count)  # type: ignore[no-untyped-call]
            print(
                f"fleetpulse: created {count} recovery partitions in {directory}", file=sys.stderr
            )
