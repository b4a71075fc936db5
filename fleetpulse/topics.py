"""The product's Kafka topics: created with the configs fleetpulse relies on, and kept so.

    python -m fleetpulse.topics [--wait-s 120]

creates the reports, dead-letter and alerts topics from the ``FLEETPULSE_*`` settings
(partitions, replication) where they are missing and aligns the configs of existing
ones. It waits until the cluster has as many brokers as the replication factor needs.
The local stack calls :func:`ensure_topics` after starting Kafka; containers and
Kubernetes run this module once (a one-shot service, a Job) before ingest and the
dataflow start, because the brokers never create topics by themselves
(``auto.create.topics.enable=false``: a typo in a topic name must fail loudly).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

# Imported from where they are defined: confluent_kafka.admin re-exports them implicitly,
# which mypy --strict does not follow.
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._metadata import TopicMetadata
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from fleetpulse.errors import ConfigError, FleetpulseError, StackError
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, load_settings

__all__ = ["ensure_topics", "main", "product_topics", "topic_configs", "wait_for_brokers"]

# librdkafka logs connection refusals while the brokers start; waiting expects them.
_QUIET = logging.getLogger("fleetpulse.topics.probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def product_topics(settings: Settings) -> list[str]:
    """The topics fleetpulse writes and reads, reports first."""
    return [
        settings.topic_reports,
        settings.topic_dlq,
        settings.topic_alerts,
        settings.topic_incidents,
    ]


def wait_for_brokers(admin: AdminClient, count: int, timeout_s: float) -> None:
    """Return once ``count`` brokers are registered; StackError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while True:
        try:
            seen = len(admin.list_topics(timeout=5).brokers)
        except KafkaException:
            seen = 0
        if seen >= count:
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{seen} Kafka broker(s) registered after {timeout_s:.0f}s, {count} needed "
                "for topics of that replication factor"
            )
        time.sleep(0.5)


def topic_configs(replication: int, *, reports: bool) -> dict[str, str]:
    """The topic configs we set, and keep set, on a topic of ours.

    ``min.insync.replicas`` is 2 from a replication factor of 3 up, so an acks=all
    write (every 202 of ingest) is on two brokers before it is acknowledged, and one
    broker may be down without stopping writes; below 3 it is 1 (2 would stop every
    write while one of two brokers is away). The reports topic keeps the broker's
    append time as each message's timestamp: the dataflow's arrival clock, which no
    producer (or robot clock) can set.
    """
    configs = {"min.insync.replicas": "2" if replication >= 3 else "1"}
    if reports:
        configs["message.timestamp.type"] = "LogAppendTime"
    return configs


def ensure_topics(
    admin: AdminClient,
    names: list[str],
    partitions: int,
    replication: int,
    *,
    reports_topic: str | None = None,
) -> None:
    """Create the topics that do not exist yet with :func:`topic_configs`; alter the
    configs of existing ones to match (printing what changed); complain if one has
    another partition count. ``reports_topic`` names the topic of reports, if listed."""
    existing = admin.list_topics(timeout=10).topics
    for name in names:
        if name in existing and len(existing[name].partitions) != partitions:
            print(
                f"warning: topic {name} has {len(existing[name].partitions)} partitions, "
                f"settings ask for {partitions}; left as it is"
            )
    missing = [
        NewTopic(
            n,
            partitions,
            replication,
            config=topic_configs(replication, reports=n == reports_topic),
        )
        for n in names
        if n not in existing
    ]
    present = [n for n in names if n in existing]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=30).items():
            try:
                future.result(timeout=30)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise StackError(f"could not create topic {name}: {exc}") from exc
                present.append(name)  # made meanwhile, or not yet in the metadata we read
    # An existing topic keeps its replication factor, so its configs follow that one.
    wanted = {
        name: topic_configs(_replicas(admin, name, replication), reports=name == reports_topic)
        for name in present
    }
    _align_configs(admin, wanted)


def _replicas(admin: AdminClient, name: str, otherwise: int) -> int:
    """The replication factor of an existing topic (``otherwise`` if the metadata lacks it)."""
    topic: TopicMetadata | None = admin.list_topics(name, timeout=10).topics.get(name)
    if topic is None or topic.error is not None or not topic.partitions:
        return otherwise
    return min(len(p.replicas) for p in topic.partitions.values())


def _describe(admin: AdminClient, name: str, timeout_s: float = 15.0) -> dict[str, ConfigEntry]:
    """The topic's configs. A topic created a moment ago may be known to the controller
    but not yet to the broker that answers (UNKNOWN_TOPIC_OR_PART): asked again until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        (future,) = admin.describe_configs(
            [ConfigResource(ResourceType.TOPIC, name)], request_timeout=30
        ).values()
        try:
            entries: dict[str, ConfigEntry] = future.result(timeout=30)
            return entries
        except KafkaException as exc:
            unknown = exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() > deadline:
                raise StackError(f"could not read the configs of topic {name}: {exc}") from exc
        time.sleep(0.1)


def _align_configs(admin: AdminClient, wanted: dict[str, dict[str, str]]) -> None:
    """Set the configs in ``wanted`` (topic -> {name: value}) where a topic differs."""
    if not wanted:
        return
    changes: list[ConfigResource] = []
    for name in wanted:
        current = _describe(admin, name)
        differ = {
            key: value
            for key, value in wanted[name].items()
            if key not in current or current[key].value != value
        }
        if not differ:
            continue
        changed = ", ".join(
            f"{k} {current[k].value if k in current else '(unset)'} -> {v}"
            for k, v in differ.items()
        )
        print(f"note: topic {name}: {changed} (altered to match what fleetpulse creates)")
        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in differ.items()
        ]
        changes.append(ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries))
    if not changes:
        return
    for resource, future in admin.incremental_alter_configs(changes, request_timeout=30).items():
        try:
            future.result(timeout=30)
        except Exception as exc:
            raise StackError(
                f"could not alter the configs of topic {resource.name}: {exc}"
            ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetpulse.topics", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=120.0,
        help="how long to wait for the brokers to come up (default 120)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        admin = AdminClient(
            kafka_config(settings, **{"socket.timeout.ms": 2000}),
            logger=_QUIET,
        )
        wait_for_brokers(admin, settings.kafka_replication, args.wait_s)
        names = product_topics(settings)
        ensure_topics(
            admin,
            names,
            settings.kafka_partitions,
            settings.kafka_replication,
            reports_topic=settings.topic_reports,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"topics ready on {settings.kafka_bootstrap_servers}: {', '.join(names)} "
        f"({settings.kafka_partitions} partitions, {settings.kafka_replication} copies)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
