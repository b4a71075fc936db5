"""The dataflow under stalls and lost Kafka history (real Kafka, Redis, the flow as users run it).

A stalled flow raises no offline alert for robots whose reports wait in Kafka; its
recovery snapshots resume only the log they were taken from; offsets that retention
deleted are skipped loudly, never silently.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from deploy.local.harness import (
    FlowProcess,
    Reporter,
    encoded,
    isolated,
    metric_total,
    produce,
    report,
    wait_until,
)
from deploy.local.procs import free_port
from deploy.local.services import ensure_topics
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader
from tests.integration.kafka_util import consume_all


def _reader(s: Settings) -> RedisStateReader:
    return RedisStateReader(connect(s), s)


def _alert_kinds(reader: RedisStateReader, robot: str) -> list[str]:
    return sorted(a.kind for a in reader.alerts(robot_id=robot, limit=100))


def test_a_paused_flow_raises_no_offline_alerts_for_robots_still_reporting(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Regression: offline was judged on the flow's own clock, so a stall longer than
    # offline_after made every robot whose reports waited in Kafka go offline and back.
    offline_after = 3.0
    s = isolated(settings, tmp_path, offline_after_s=offline_after, dataflow_metrics_port=0)
    reader = _reader(s)
    talkers = [f"alive-{i}" for i in range(8)]
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        produce(s, encoded([report("quiet-1", 0)]))
        with Reporter(s, talkers, 0.25) as reporter:
            wait_until("all online", lambda: reader.summary().online == 9, 60, [flow])
            os.killpg(flow.proc.pid, signal.SIGSTOP)
            paused_at = reporter.seq
            time.sleep(offline_after + 10)
            os.killpg(flow.proc.pid, signal.SIGCONT)
            resumed_at = reporter.seq
            assert resumed_at > paused_at + 30  # they kept reporting all along
            wait_until(
                "the backlog read",
                lambda: all(
                    (st := reader.get(r)) is not None and st.report.seq >= resumed_at
                    for r in talkers
                ),
                60,
                [flow],
            )
            # The robot that really went silent during the pause does go offline.
            wait_until("quiet-1 offline", lambda: not reader.get("quiet-1").online, 30, [flow])  # type: ignore[union-attr]
            time.sleep(2)
        for robot in talkers:
            assert _alert_kinds(reader, robot) == [], robot
            st = reader.get(robot)
            assert st is not None and st.online
        assert _alert_kinds(reader, "quiet-1") == ["offline"]
        assert reader.summary().online == 8
    finally:
        os.killpg(flow.proc.pid, signal.SIGCONT)
        flow.stop()


def _recreate(admin: AdminClient, s: Settings) -> None:
    """Delete the test's topics and create them again, as a reset stack or an operator would."""
    topics = [s.topic_reports, s.topic_dlq, s.topic_alerts, s.topic_incidents]
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        future.result(60)
    deadline = time.monotonic() + 60
    while set(topics) & set(admin.list_topics(timeout=10).topics):
        assert time.monotonic() < deadline, "topics not deleted"
        time.sleep(0.2)
    while True:
        try:
            ensure_topics(admin, topics, s.kafka_partitions, 1, reports_topic=s.topic_reports)
            return
        except Exception:  # "marked for deletion" for a moment after the delete
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_a_snapshot_of_deleted_topics_is_not_resumed(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Regression: after `just stack-reset` (topics and Redis gone, the recovery store
    # kept) one batch of 100 reports for 100 robots got 202, and 15 s later only 52
    # robots existed: the snapshot's offsets of the old topic skipped the rest, silently.
    s = isolated(settings, tmp_path, offline_after_s=600.0)
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers})
    old = _reader(s)
    flow = FlowProcess(s, tmp_path / "a.log")
    try:
        produce(s, encoded([report(f"old-{r}", seq) for seq in range(20) for r in range(50)]))
        wait_until(
            "the old topic read",
            lambda: all((st := old.get(f"old-{r}")) and st.report.seq == 19 for r in range(50)),
            60,
            [flow],
        )
        time.sleep(2 * s.snapshot_interval_s + 1)  # its offsets are in a snapshot
    finally:
        flow.stop()
    _recreate(admin, s)
    fresh = msgspec.structs.replace(s, redis_prefix=s.redis_prefix + "b")  # Redis was reset too
    reader = _reader(fresh)
    produce(fresh, encoded([report(f"amr-{r}", 0) for r in range(100)]))
    flow = FlowProcess(fresh, tmp_path / "b.log")
    try:
        wait_until("all 100 robots", lambda: reader.summary().total == 100, 60, [flow])
        time.sleep(1)
        assert reader.summary().total == 100
        assert "belongs to" in flow.output()  # said loudly
    finally:
        flow.stop()


def test_a_topic_recreated_under_a_running_flow_stops_it_and_a_restart_starts_clean(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(settings, tmp_path, offline_after_s=600.0)
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers})
    reader = _reader(s)
    flow = FlowProcess(s, tmp_path / "a.log")
    try:
        produce(s, encoded([report(f"amr-{r}", seq) for seq in range(10) for r in range(20)]))
        wait_until("the first topic read", lambda: reader.summary().total == 20, 60, [flow])
        _recreate(admin, s)
        flow.proc.wait(60)  # the topic watch notices within its check interval
    finally:
        flow.stop()
    assert "was deleted and created again" in flow.output()
    # The robots go on reporting (their seq goes on); the restarted flow reads the new topic
    # from its start although its snapshot held offsets of the old one.
    produce(s, encoded([report(f"amr-{r}", 10 + seq) for seq in range(3) for r in range(20)]))
    flow = FlowProcess(s, tmp_path / "b.log")
    try:
        wait_until(
            "every robot at seq 12",
            lambda: all((st := reader.get(f"amr-{r}")) and st.report.seq == 12 for r in range(20)),
            60,
            [flow],
        )
        assert "belongs to" in flow.output()
    finally:
        flow.stop()


def test_offsets_deleted_while_the_flow_was_down_resume_at_the_earliest_retained(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Regression: the snapshot offset out of range made librdkafka jump to the end
    # (auto.offset.reset=latest): every report produced after retention and before the
    # restart was skipped silently, and the consumer error went to the DLQ as bad data.
    s = isolated(settings, tmp_path, partitions=1, offline_after_s=600.0)
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers})
    reader = _reader(s)
    flow = FlowProcess(s, tmp_path / "a.log")
    try:
        produce(s, encoded([report("ret-a", seq) for seq in range(100)]))
        wait_until(
            "ret-a read", lambda: (st := reader.get("ret-a")) and st.report.seq == 99, 60, [flow]
        )
        time.sleep(2 * s.snapshot_interval_s + 1)
    finally:
        flow.stop()
    produce(s, encoded([report("ret-b", seq) for seq in range(100)]))  # offsets 100..199
    # Retention passes while the flow is down: everything before offset 150 goes.
    done = admin.delete_records([TopicPartition(s.topic_reports, 0, 150)])
    for future in done.values():
        future.result(30)
    produce(s, encoded([report("ret-c", seq) for seq in range(10)]))  # offsets 200..209
    port = free_port()
    s2 = msgspec.structs.replace(s, dataflow_metrics_port=port)
    flow = FlowProcess(s2, tmp_path / "b.log")
    try:
        wait_until(
            "ret-c read", lambda: (st := reader.get("ret-c")) and st.report.seq == 9, 60, [flow]
        )
        b = reader.get("ret-b")
        assert b is not None and b.report.seq == 99  # 150..199 were read
        assert [r.seq for r in reader.history("ret-b", limit=100)] == list(range(99, 49, -1))
        assert metric_total([port], "fleetpulse_flow_skipped_offsets_total") == 50
        assert "offsets 100..149 were deleted" in flow.output()
    finally:
        flow.stop()
    assert consume_all(s, s.topic_dlq, expect=0, timeout_s=3) == []
