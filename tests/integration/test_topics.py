"""Our topics carry the configs we rely on, on real Kafka: created so, and put back so."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from deploy.local.services import ensure_topics, topic_configs
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all

KEYS = ("min.insync.replicas", "message.timestamp.type")


@pytest.fixture
def names(kafka_admin: AdminClient) -> Iterator[list[str]]:
    """Topic names for one test (reports, dlq, alerts); whatever exists of them goes after."""
    tag = uuid.uuid4().hex[:10]
    made = [f"test.{tag}.reports", f"test.{tag}.dlq", f"test.{tag}.alerts"]
    yield made
    present = set(kafka_admin.list_topics(timeout=10).topics)
    gone = [n for n in made if n in present]
    if gone:
        for future in kafka_admin.delete_topics(gone, operation_timeout=30).values():
            future.result(timeout=60)


def configs(admin: AdminClient, name: str) -> dict[str, str]:
    """The configs we manage, as the broker reports them (once it knows the topic)."""
    deadline = time.monotonic() + 15
    while True:
        (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name)]).values()
        try:
            entries = future.result(timeout=30)
            return {k: entries[k].value for k in KEYS}
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            assert time.monotonic() < deadline, f"the broker never knew topic {name}"
        time.sleep(0.1)


def settles_to(admin: AdminClient, name: str, want: dict[str, str]) -> dict[str, str]:
    """The topic's configs once they equal ``want`` (an alteration reaches the broker
    through the controller's metadata a moment after it is acknowledged), or at 15 s."""
    deadline = time.monotonic() + 15
    while (got := configs(admin, name)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_min_insync_replicas_is_two_from_three_replicas_up() -> None:
    assert [topic_configs(rf, reports=False)["min.insync.replicas"] for rf in (1, 2, 3, 5)] == [
        "1",
        "1",
        "2",
        "2",
    ]
    assert topic_configs(3, reports=True) == {
        "min.insync.replicas": "2",
        "message.timestamp.type": "LogAppendTime",
    }


def test_created_topics_have_our_configs(
    kafka_admin: AdminClient, settings: Settings, names: list[str]
) -> None:
    reports, dlq, alerts = names
    ensure_topics(kafka_admin, names, 3, 1, reports_topic=reports)
    assert configs(kafka_admin, reports) == {
        "min.insync.replicas": "1",
        "message.timestamp.type": "LogAppendTime",
    }
    for other in (dlq, alerts):
        assert configs(kafka_admin, other) == {
            "min.insync.replicas": "1",
            "message.timestamp.type": "CreateTime",
        }

    # A producer's timestamp does not survive on the reports topic: the broker's does.
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    producer.produce(reports, key=b"amr-1", value=b"{}", timestamp=1_000)
    assert producer.flush(15) == 0
    (msg,) = consume_all(settings, reports, expect=1)
    kind, ts_ms = msg.timestamp()
    assert kind == TIMESTAMP_LOG_APPEND_TIME
    assert ts_ms > 1_700_000_000_000


def test_existing_topics_whose_configs_differ_are_altered_with_a_note(
    kafka_admin: AdminClient, names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    reports, dlq, alerts = names
    old = {"message.timestamp.type": "CreateTime", "min.insync.replicas": "2"}
    made = kafka_admin.create_topics(
        [NewTopic(reports, 3, 1, config=old), NewTopic(dlq, 3, 1, config=old)]
    )
    for future in made.values():
        future.result(timeout=30)

    ensure_topics(kafka_admin, names, 3, 1, reports_topic=reports)

    want = {"min.insync.replicas": "1", "message.timestamp.type": "LogAppendTime"}
    assert settles_to(kafka_admin, reports, want) == want
    # Only the configs we manage are touched: the DLQ keeps its CreateTime.
    want = {"min.insync.replicas": "1", "message.timestamp.type": "CreateTime"}
    assert settles_to(kafka_admin, dlq, want) == want
    out = capsys.readouterr().out
    assert (
        f"note: topic {reports}: min.insync.replicas 2 -> 1, "
        "message.timestamp.type CreateTime -> LogAppendTime" in out
    ), out
    assert f"note: topic {dlq}: min.insync.replicas 2 -> 1 " in out, out
    assert alerts not in out  # created, not altered

    ensure_topics(kafka_admin, names, 3, 1, reports_topic=reports)
    assert "note:" not in capsys.readouterr().out  # nothing left to change


def test_the_stacks_reports_topic_keeps_append_time(
    stack: Stack, kafka_admin: AdminClient, settings: Settings
) -> None:
    # stack.up() (the session's `stack` fixture) ran ensure_topics on the product topics.
    assert configs(kafka_admin, settings.topic_reports)["message.timestamp.type"] == (
        "LogAppendTime"
    )
    for name in (settings.topic_dlq, settings.topic_alerts):
        assert (
            configs(kafka_admin, name)["min.insync.replicas"]
            == topic_configs(settings.kafka_replication, reports=False)["min.insync.replicas"]
        )
