"""The reports topic as a Bytewax source that emits items already keyed by robot.

Bytewax's own KafkaSource builds a ``KafkaSourceMessage`` dataclass per message and
the flow then needs a step to key it; the profile of a drain put the two at about a
fifth of a process's time. This source does both in one pass over librdkafka's
messages: each becomes ``(robot id, Raw)`` — the raw value kept as bytes, decoded later
inside the per-robot step — or ``("!dlq", DeadLetter)`` when it cannot be keyed.

Like Bytewax's, it is a fixed-partitioned source: one partition per Kafka partition,
its snapshot is the next offset to read, so a restart resumes from the last epoch.
It also reports each partition's consumer lag (from librdkafka's statistics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from dataflows.records import DLQ_KEY, DeadLetter, Raw
from fleetpulse.schema import is_robot_id
from fleetpulse.settings import Settings
from observability.metrics import DataflowMetrics

__all__ = ["Keyed", "ReportSource", "key_message"]

Keyed = tuple[str, Raw | DeadLetter]


def key_message(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None,
    partition: int,
    offset: int,
    append_ms: int,
) -> Keyed:
    """Key one message by robot id without decoding its value (pure; unit-tested)."""
    try:
        robot = key.decode("ascii") if key else ""
    except UnicodeDecodeError:
        robot = ""
    if not is_robot_id(robot):
        return (DLQ_KEY, DeadLetter(key, value, "message key is not a robot id", partition, offset))
    traceparent = ""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, header in pairs:
        if name == "traceparent" and header:
            traceparent = header if isinstance(header, str) else header.decode("ascii", "replace")
    return (robot, (robot, value, traceparent, partition, offset, append_ms))


class ReportSource(FixedPartitionedSource[Keyed, int]):
    """Every partition of the reports topic, from the beginning (or the snapshot's offset)."""

    def __init__(
        self,
        settings: Settings,
        metrics: DataflowMetrics | None,
        *,
        tail: bool = True,
        batch_size: int = 2000,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tail = tail
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        topic = self.settings.topic_reports
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap_servers})
        meta = admin.list_topics(topic, timeout=30).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"cannot read topic {topic}: {meta.error.str()}")
        return [f"{p}-{topic}" for p in sorted(meta.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Partition:
        index, _, topic = for_part.partition("-")
        if topic != self.settings.topic_reports:
            raise RuntimeError(
                f"the recovery snapshot is for topic {topic!r}, not {self.settings.topic_reports!r}"
            )
        return _Partition(self, int(index), resume_state)


class _Partition(StatefulSourcePartition[Keyed, int]):
    def __init__(self, source: ReportSource, index: int, resume: int | None) -> None:
        s = source.settings
        self.topic = s.topic_reports
        self.index = index
        self.batch_size = source.batch_size
        self.metrics = source.metrics
        self.offset = resume if resume is not None else OFFSET_BEGINNING
        self.eof = False
        self.consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_bootstrap_servers,
                # Offsets live in the recovery snapshots, not in a consumer group.
                "group.id": s.consumer_group,
                "enable.auto.commit": False,
                "enable.partition.eof": not source.tail,
                "statistics.interval.ms": 1000,
                "stats_cb": self._stats,
            }
        )
        self.consumer.assign([TopicPartition(self.topic, index, self.offset)])

    def _stats(self, stats_json: str) -> None:
        if self.metrics is None:
            return
        stats: dict[str, Any] = json.loads(stats_json)
        part = stats.get("topics", {}).get(self.topic, {}).get("partitions", {})
        mine = part.get(str(self.index))
        if mine is None or mine.get("hi_offset", -1) < 0:
            return
        # librdkafka's own consumer_lag is -1 until a message was read or an offset
        # committed; ours is defined from the first stats on: the end minus what we read.
        read_from = self.offset if self.offset >= 0 else mine.get("lo_offset", 0)
        self.metrics.consumer_lag.labels(str(self.index)).set(
            max(0, mine["hi_offset"] - max(read_from, 0))
        )

    def next_batch(self) -> list[Keyed]:
        if self.eof:
            raise StopIteration
        out: list[Keyed] = []
        for msg in self.consumer.consume(self.batch_size, 0.001):
            err = msg.error()
            offset = msg.offset() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.eof = True
                    break
                dead = DeadLetter(msg.key(), msg.value(), f"kafka error: {err.str()}",
                                  self.index, offset)  # fmt: skip
                out.append((DLQ_KEY, dead))
                continue
            ts = msg.timestamp()[1]
            out.append(key_message(msg.key(), msg.value(), msg.headers(), self.index, offset, ts))
            self.offset = offset + 1
        return out

    def snapshot(self) -> int:
        return self.offset

    def close(self) -> None:
        self.consumer.close()
