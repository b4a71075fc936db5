"""The fleet job in Quix Streams, for the side-by-side drain benchmark.

    bench/.venv-quix/bin/python -m bench.quix_job   (PYTHONPATH = the repository)

Runs in a venv of its own (``bench.drain`` makes it): Quix Streams 3.28 needs
confluent-kafka < 2.13, the product pins 2.16. The job is the product's: the same
pure per-robot functions (ordering, live state, alerts, windows) kept in Quix's
RocksDB state per robot key, and the same coalesced, idempotent Redis batch written
from a Quix ``BatchingSink`` at each checkpoint. It stops once the topic has been
quiet for a few seconds.
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import uuid
from typing import Any

from quixstreams import Application, State
from quixstreams.sinks import BatchingSink, SinkBatch
from quixstreams.state.rocksdb import RocksDBOptions

from dataflows.robot import Emits, on_report
from dataflows.rules import Rules
from fleetpulse.schema import Alert, LiveState, WindowStats, decode_report
from fleetpulse.settings import load_settings
from state.connect import connect
from state.writer import RedisStateWriter, coalesce


class RedisSink(BatchingSink):  # type: ignore[misc]
    """One coalesced, idempotent Redis batch per Quix checkpoint and partition."""

    def __init__(self, writer: RedisStateWriter) -> None:
        super().__init__()
        self.writer = writer

    def write(self, batch: SinkBatch) -> None:
        changes: list[LiveState] = []
        windows: list[WindowStats] = []
        alerts: list[Alert] = []
        for item in batch:
            emits: Emits = item.value
            changes += emits.states
            windows += emits.windows
            alerts += emits.alerts
        if changes or windows or alerts:
            newest, history = coalesce(changes)
            self.writer.write(newest, windows, alerts, history)


def main() -> int:
    settings = load_settings()
    rules = Rules.from_settings(settings)
    with tempfile.TemporaryDirectory() as state_dir:
        app = Application(
            broker_address=settings.kafka_bootstrap_servers,
            consumer_group=f"quix-bench-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            commit_interval=1.0,
            state_dir=state_dir,
            rocksdb_options=RocksDBOptions(dumps=pickle.dumps, loads=pickle.loads),
            loglevel="WARNING",
        )
        topic = app.topic(
            settings.topic_reports, key_deserializer="str", value_deserializer="bytes"
        )
        sdf = app.dataframe(topic)

        def process(value: bytes, _key: Any, timestamp: int, _headers: Any, state: State) -> Any:
            report = decode_report(value)
            robot, emits = on_report(state.get("robot"), report, timestamp / 1000, 0, rules)
            state.set("robot", robot)
            return emits

        sdf = sdf.apply(process, stateful=True, metadata=True)
        sdf.sink(RedisSink(RedisStateWriter(connect(settings), settings)))
        app.run(timeout=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
