"""Helpers for integration tests that read what landed on a topic."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message

from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings


def consume_all(
    settings: Settings, topic: str, expect: int, timeout_s: float = 30.0
) -> list[Message]:
    """Read ``topic`` from the start until ``expect`` messages arrived (or the time is up),
    then keep reading for a short while to catch anything unexpected beyond them."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.5)
            for msg in batch:
                err = msg.error()
                if err is not None:
                    raise AssertionError(f"consumer error: {err}")
                got.append(msg)
            if len(got) >= expect and quiet_until is None:
                quiet_until = time.monotonic() + 1.5
            if quiet_until is not None and time.monotonic() >= quiet_until:
                break
    finally:
        consumer.close()
    return got
