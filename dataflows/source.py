"""The reports topic as a Bytewax source: messages keyed by shard, plus the arrival clock.

Each Kafka message becomes ``(shard key, Raw)`` — the value kept as bytes, decoded
later inside the shard step — or ``("!dlq", DeadLetter)`` when its key is not a robot
id, or ``(shard key, Control)`` for an operator's command (:mod:`fleetpulse.control`).

**Progress.** After the messages it read, each partition sends every shard a
:data:`~dataflows.records.Progress` mark: the arrival time (Kafka append time) up to
which it has read everything. While it reads a backlog that is the append time of
the last message read; once the broker says (asked at time t, never from a cached
answer: after a pause the cache is stale) that nothing lies beyond what was read, it
is t minus :data:`PROGRESS_MARGIN_S` (for clock skew between broker and flow).
Offline detection and window closing run on these marks, so a flow that stalls or
lags decides nothing on time it has not read. The reports topic stamps
``LogAppendTime`` (the stack creates it so); on a topic with producer timestamps the
timestamp is capped at the wall clock.

**Recovery.** Like Bytewax's own, it is a fixed-partitioned source: one partition per
Kafka partition, its snapshot the next offset to read — bound to the Kafka cluster id,
the topic id and the shard count (:class:`Binding`). A snapshot bound to anything else
(the topic was deleted and created again, another cluster, a reset stack) is said
loudly and ignored: the partition starts from the beginning of the retained log, and
the shards start empty (``dataflows.shard``). A topic recreated while the flow runs
stops the flow with that message, for its supervisor to restart it clean.

**Kafka edges.** An offset that retention deleted while the flow was down resumes at
the earliest retained one, the skipped range logged and counted (never librdkafka's
silent jump to the end). Transport errors are logged and counted, never dead-lettered.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from dataflows.records import DLQ_KEY, Control, DeadLetter, Raw, Republish
from dataflows.republish import ProjectionWatch
from dataflows.shard import shard_key, shard_keys
from fleetpulse import control
from fleetpulse.errors import FleetpulseError
from fleetpulse.kafka_config import kafka_config
from fleetpulse.schema import is_robot_id
from fleetpulse.settings import Settings
from observability.metrics import DataflowMetrics

__all__ = [
    "PROGRESS_MARGIN_S",
    "Binding",
    "Keyed",
    "RecoveryMismatch",
    "ReportSource",
    "SourcePosition",
    "key_message",
]

log = logging.getLogger("fleetpulse.dataflow.source")

Keyed = tuple[str, Raw | DeadLetter | Control | Republish | tuple[int, int]]

# Room for clock skew between the broker (append times) and this host (the time we
# asked for the partition's end).
PROGRESS_MARGIN_S = 1.0
MARK_EVERY_S = 0.2  # how often a partition tells the shards its progress
ENDS_TIMEOUT_S = 0.5  # how long one partition's end may take to come
ENDS_BACKOFF_S = 1.0  # first wait before asking again for an end that could not be had
ENDS_BACKOFF_MAX_S = 8.0
TOPIC_CHECK_S = 10.0  # how often a running flow checks that its topic was not recreated
_LOG_EVERY_S = 30.0  # repeated consumer errors are logged at most this often


class RecoveryMismatch(FleetpulseError):  # noqa: N818 - named for what happened
    """The reports topic is not the one the flow's recovery snapshots were taken from."""


class Binding(msgspec.Struct, frozen=True):
    """What recovery snapshots belong to: a cluster, a topic (by id) and a shard count."""

    cluster_id: str
    topic: str
    topic_id: str
    shards: int

    @property
    def text(self) -> str:
        """The form stored in snapshots."""
        return (
            f"cluster {self.cluster_id}, topic {self.topic} ({self.topic_id}), {self.shards} shards"
        )

    @classmethod
    def read(cls, settings: Settings, timeout_s: float = 30.0) -> Binding:
        """Ask Kafka for the cluster id and the reports topic's id."""
        admin = AdminClient(kafka_config(settings))
        topic = settings.topic_reports
        try:
            cluster = admin.describe_cluster(request_timeout=timeout_s).result(timeout_s)
            described = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout_s)
            topic_id = str(described[topic].result(timeout_s).topic_id)
        except KafkaException as exc:
            raise FleetpulseError(
                f"cannot read topic {topic} and its cluster id from Kafka at "
                f"{settings.kafka_bootstrap_servers} ({exc}); is Kafka up?"
            ) from None
        return cls(str(cluster.cluster_id), topic, topic_id, settings.shards)


class SourcePosition(msgspec.Struct, frozen=True, array_like=True):
    """A partition's snapshot: the next offset to read, and what it belongs to."""

    binding: str
    offset: int


def key_message(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None,
    partition: int,
    offset: int,
    arrival_ms: int,
    shards: int,
) -> Keyed:
    """Key one message by its robot's shard without decoding its value (pure; unit-tested)."""
    keyed = _robot_and_shard(key, shards)
    if keyed is None:
        dead = DeadLetter(key, value, "key", "message key is not a robot id", partition, offset)
        return (DLQ_KEY, dead)
    robot, shard = keyed
    traceparent = ""
    is_control = False
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, header in pairs:
        if name == "traceparent" and header:
            traceparent = header if isinstance(header, str) else header.decode("ascii", "replace")
        elif name == control.CONTROL_HEADER:
            is_control = True
    if is_control:
        try:
            command = control.decode_control(value or b"")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            dead = DeadLetter(
                key, value, "invalid", f"invalid control record: {exc}", partition, offset
            )
            return (shard, dead)
        if command.robot_id != robot:
            reason = f"key {robot!r} does not match the control record's robot_id"
            return (shard, DeadLetter(key, value, "key", reason, partition, offset))
        command_item = Control(
            robot, command.control, command.by, partition, offset, arrival_ms, command.incident
        )
        return (shard, command_item)
    return (shard, (robot, value, traceparent, partition, offset, arrival_ms))


@functools.lru_cache(maxsize=1 << 17)
def _robot_and_shard(key: bytes | None, shards: int) -> tuple[str, str] | None:
    """(robot id, shard key) of a message key, or None if it is not a robot id.

    Remembered for the robots seen lately: the same keys come back every second.
    """
    try:
        robot = key.decode("ascii") if key else ""
    except UnicodeDecodeError:
        return None
    return (robot, shard_key(robot, shards)) if is_robot_id(robot) else None


class ReportSource(FixedPartitionedSource[Keyed, SourcePosition]):
    """Every partition of the reports topic, from the beginning (or the snapshot's offset)."""

    def __init__(
        self,
        settings: Settings,
        metrics: DataflowMetrics | None,
        binding: Binding,
        *,
        tail: bool = True,
        batch_size: int = 2000,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.binding = binding
        self.tail = tail
        self.batch_size = batch_size
        self.keys = shard_keys(settings.shards)
        self.ends = _Ends(settings)
        self._watch: _TopicWatch | None = None
        self.projection: ProjectionWatch | None = None
        self._lock = threading.Lock()

    def list_parts(self) -> list[str]:
        topic = self.settings.topic_reports
        admin = AdminClient(kafka_config(self.settings))
        meta = admin.list_topics(topic, timeout=30).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"cannot read topic {topic}: {meta.error.str()}")
        return [f"{p}-{topic}" for p in sorted(meta.partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: SourcePosition | None
    ) -> _Partition:
        index, _, topic = for_part.partition("-")
        if topic != self.settings.topic_reports:
            raise RuntimeError(
                f"the recovery snapshot is for topic {topic!r}, not {self.settings.topic_reports!r}"
            )
        offset = None
        if resume_state is not None:
            bound = getattr(resume_state, "binding", None)
            if bound == self.binding.text:
                offset = resume_state.offset
            else:
                _note_clean(
                    f"the recovery snapshot of {for_part} belongs to {bound or 'an older format'}, "
                    f"not to {self.binding.text}"
                )
        with self._lock:
            if self._watch is None and self.tail:
                self._watch = _TopicWatch(self.settings, self.binding)
                self.projection = ProjectionWatch(self.settings, self.metrics)
        return _Partition(self, int(index), offset)


_noted: set[str] = set()


def _note_clean(why: str) -> None:
    if why not in _noted:
        _noted.add(why)
        log.error("%s: this partition is read again from its earliest retained offset", why)


class _Ends:
    """The partitions' end offsets, asked of their leaders at most every MARK_EVERY_S.

    Asked through a consumer of its own that reads nothing (``query_watermark_offsets``
    on its own connections): the reading consumers' requests wait behind their fetch
    long poll (up to fetch.wait.max.ms, 500 ms), which stalled the flow's epochs; and
    not through an admin client: once an admin client's ListOffsets has met a dead
    leader, librdkafka spins a core in it (measured: 70-85% of a core for as long as
    the broker is away), which on 2 cores starved the Kafka controllers until their
    leadership flapped for half a minute. A partition whose end cannot be had (its
    leader is down until the controller moves it) is asked again after a back-off
    (ENDS_BACKOFF_S doubling to ENDS_BACKOFF_MAX_S); meanwhile its clock stands still.
    """

    def __init__(self, settings: Settings) -> None:
        self._client = Consumer(
            kafka_config(
                settings, **{"group.id": settings.consumer_group, "enable.auto.commit": False}
            )
        )
        self._topic = settings.topic_reports
        self._lock = threading.Lock()
        self._partitions: set[int] = set()
        self._asked_at = 0.0
        self._ends: dict[int, int] = {}
        self._backoff: dict[int, float] = {}  # partition -> current back-off (s)
        self._retry_at: dict[int, float] = {}  # partition -> when to ask again

    def add(self, partition: int) -> None:
        """Ask for ``partition``'s end too from now on."""
        with self._lock:
            self._partitions.add(partition)

    def end(self, partition: int) -> tuple[float, int] | None:
        """(when it was asked, the end offset) of ``partition``, or None if unknown."""
        with self._lock:
            asked = time.time()
            if asked - self._asked_at >= MARK_EVERY_S:
                self._ask(asked)
                self._asked_at = asked
            end = self._ends.get(partition)
            return None if end is None else (self._asked_at, end)

    def _ask(self, now: float) -> None:
        for p in sorted(self._partitions):
            if self._retry_at.get(p, 0.0) > now:
                continue
            try:
                _low, high = self._client.get_watermark_offsets(
                    TopicPartition(self._topic, p), timeout=ENDS_TIMEOUT_S, cached=False
                )
            except KafkaException as exc:
                self._failed(p, now, str(exc))
                continue
            self._ends[p] = high
            self._backoff.pop(p, None)
            self._retry_at.pop(p, None)

    def _failed(self, partition: int, now: float, why: str) -> None:
        self._ends.pop(partition, None)  # unknown: its clock does not move meanwhile
        first = partition not in self._backoff
        wait = min(self._backoff.get(partition, ENDS_BACKOFF_S / 2) * 2, ENDS_BACKOFF_MAX_S)
        self._backoff[partition], self._retry_at[partition] = wait, now + wait
        if first:
            log.warning(
                "cannot ask for the end of %s[%d] (%s); asking again in %.1fs, backing off",
                self._topic, partition, why, wait,
            )  # fmt: skip


class _TopicWatch:
    """Checks now and then (in a thread of its own) that the topic is still the same one."""

    def __init__(self, settings: Settings, binding: Binding) -> None:
        self.binding = binding
        self.problem: str | None = None
        self._admin = AdminClient(kafka_config(settings))
        thread = threading.Thread(target=self._run, name="topic-watch", daemon=True)
        thread.start()

    def _run(self) -> None:
        topic = self.binding.topic
        while self.problem is None:
            time.sleep(TOPIC_CHECK_S)
            try:
                found = self._admin.describe_topics(TopicCollection([topic]), request_timeout=10)
                topic_id = str(found[topic].result(15).topic_id)
            except Exception as exc:  # missing for now, or Kafka unreachable: keep looking
                log.warning("cannot check topic %s: %s", topic, exc)
                continue
            if topic_id != self.binding.topic_id:
                self.problem = (
                    f"topic {topic} was deleted and created again (id {self.binding.topic_id} "
                    f"-> {topic_id}); the flow's state and offsets belong to the old topic. "
                    "Stopping: a restart starts clean from the new topic's beginning"
                )


class _Partition(StatefulSourcePartition[Keyed, SourcePosition]):
    def __init__(self, source: ReportSource, index: int, resume: int | None) -> None:
        s = source.settings
        self.source = source
        self.topic = s.topic_reports
        self.index = index
        self.batch_size = source.batch_size
        self.metrics = source.metrics
        self.keys = source.keys
        self.shards = s.shards
        self.offset = resume if resume is not None else OFFSET_BEGINNING
        self.read_to = 0.0  # arrival clock (s) up to which everything was read
        self.last_arrival_ms = 0  # arrival of the newest message read
        self.marked = 0.0  # read_to of the last progress mark sent
        self.marked_at = 0.0  # wall clock of the last mark
        self.republish = ""  # the last re-publish token passed on to the shards
        self.eof = False
        self.ended = False
        self._last_log: dict[int, float] = {}
        self.consumer = Consumer(
            kafka_config(
                s,
                **{
                    # Offsets live in the recovery snapshots, not in a consumer group.
                    "group.id": s.consumer_group,
                    "enable.auto.commit": False,
                    "enable.partition.eof": not source.tail,
                    # Out of range: tell us (we resume at the earliest retained offset and
                    # say so) instead of librdkafka's default silent jump to the end.
                    "auto.offset.reset": "error",
                    "statistics.interval.ms": 1000,
                    "stats_cb": self._stats,
                    "error_cb": self._client_error,
                },
            )
        )
        self.tp = TopicPartition(self.topic, index, self.offset)
        self.consumer.assign([self.tp])
        source.ends.add(index)

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

    def _client_error(self, err: KafkaError) -> None:
        self._transport(err)

    def _transport(self, err: KafkaError) -> None:
        """A consumer or transport error: counted, logged now and then, never dead-lettered."""
        if self.metrics is not None:
            self.metrics.consumer_errors.labels(err.name()).inc()
        now = time.monotonic()
        if now - self._last_log.get(err.code(), -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_log[err.code()] = now
            log.warning(
                "Kafka consumer of %s[%d]: %s (retrying)", self.topic, self.index, err.str()
            )

    def next_batch(self) -> list[Keyed]:
        if self.ended:
            raise StopIteration
        watch = self.source._watch
        if watch is not None and watch.problem is not None:
            raise RecoveryMismatch(watch.problem)
        out: list[Keyed] = []
        msgs = [] if self.eof else self.consumer.consume(self.batch_size, 0.001)
        now = time.time()
        newest = -1.0
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.eof = True
                elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                    self._out_of_range(err)
                    break
                else:
                    self._transport(err)
                continue
            offset = msg.offset() or 0
            kind, stamp = msg.timestamp()
            # Producer timestamps (another topic setup) are capped at our clock.
            arrival_ms = stamp if kind == TIMESTAMP_LOG_APPEND_TIME else min(stamp, int(now * 1000))
            if arrival_ms <= 0:
                arrival_ms = int(now * 1000)
            # Never backwards within a partition (the timers rely on it): a broker clock
            # step, or producer timestamps on a topic not set to LogAppendTime.
            arrival_ms = max(arrival_ms, self.last_arrival_ms)
            self.last_arrival_ms = arrival_ms
            out.append(
                key_message(
                    msg.key(),
                    msg.value(),
                    msg.headers(),
                    self.index,
                    offset,
                    arrival_ms,
                    self.shards,
                )
            )
            self.offset = offset + 1
            # A later message may share the last one's millisecond: claim one ms less.
            newest = max(newest, arrival_ms / 1000 - 0.001)
        if newest > self.read_to:
            self.read_to = newest
        if not msgs or self.eof:
            self._caught_up()
        if self.read_to > self.marked and (now - self.marked_at >= MARK_EVERY_S or self.eof):
            mark = (self.index, int(self.read_to * 1000))
            out += [(key, mark) for key in self.keys]
            self.marked, self.marked_at = self.read_to, now
        projection = self.source.projection
        if projection is not None and projection.pending != self.republish:
            self.republish = projection.pending
            out += [(key, Republish(self.republish)) for key in self.keys]
        if self.eof:
            self.ended = True
        return out

    def _caught_up(self) -> None:
        """Nothing came: if the broker's end is where we are, the clock moved on."""
        # Asked of the broker, never librdkafka's cached end: after a pause (SIGSTOP, a
        # long GC) the cache still holds the end from before, and messages appended
        # meanwhile would be taken as never sent.
        answer = self.source.ends.end(self.index)
        if answer is None:
            return
        asked, end = answer
        # Before the first message (offset still "beginning") only an empty log is read.
        # (A log whose every message retention deleted holds no robot's reports either.)
        if max(self.offset, 0) >= end:
            self.read_to = max(self.read_to, asked - PROGRESS_MARGIN_S)

    def _out_of_range(self, err: KafkaError) -> None:
        """Resume at the earliest retained offset; log and count what was skipped."""
        low, high = self.consumer.get_watermark_offsets(self.tp, timeout=10, cached=False)
        at = self.offset
        if at < low:
            skipped = low - max(at, 0)
            log.error(
                "%s[%d]: offsets %d..%d were deleted (retention) before the flow read them: "
                "%d messages skipped; resuming at %d",
                self.topic, self.index, at, low - 1, skipped, low,
            )  # fmt: skip
            if self.metrics is not None:
                self.metrics.skipped.labels(str(self.index)).inc(skipped)
        else:
            log.error(
                "%s[%d]: offset %d is past the end (%d): the partition was truncated or "
                "recreated; resuming at its earliest offset %d (%s)",
                self.topic, self.index, at, high, low, err.str(),
            )  # fmt: skip
        self.offset = low
        self.tp = TopicPartition(self.topic, self.index, low)
        self.consumer.assign([self.tp])

    def snapshot(self) -> SourcePosition:
        return SourcePosition(self.source.binding.text, self.offset)

    def close(self) -> None:
        self.consumer.close()
