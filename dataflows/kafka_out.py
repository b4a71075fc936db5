"""Kafka output with delivery checked: alerts and dead letters must not vanish.

Bytewax's own KafkaSink flushes but never looks at delivery reports, so a message
the broker refused is dropped silently. Here every delivery report is read; if any
failed, ``send`` raises, the dataflow stops, and a restart resumes from the last
snapshot and sends the epoch again (the consumers of these topics see at-least-once
delivery; alerts carry a deterministic id to deduplicate by).
"""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import KafkaError, Message, Producer

from fleetpulse.errors import FleetpulseError
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings

__all__ = ["CheckedProducer", "DeliveryFailed", "OutMessage"]

# (topic, key, value, headers)
OutMessage = tuple[str, bytes | None, bytes, list[tuple[str, str | bytes | None]]]


class DeliveryFailed(FleetpulseError):  # noqa: N818 - named for what happened
    """Kafka did not take a message the dataflow had to write."""


class CheckedProducer:
    """An idempotent acks=all producer whose ``send`` returns only when all is delivered."""

    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._producer = Producer(
            kafka_config(
                settings,
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "compression.type": "lz4",
                    "message.timeout.ms": int(timeout_s * 1000),
                },
            )
        )
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")

    def send(self, messages: Sequence[OutMessage]) -> None:
        """Produce every message and wait for all delivery reports; raise if any failed."""
        if not messages:
            return
        for topic, key, value, headers in messages:
            while True:
                try:
                    self._producer.produce(
                        topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                    )
                    break
                except BufferError:  # queue full: let deliveries drain, then retry
                    self._producer.poll(0.1)
        left = self._producer.flush(self._timeout_s)
        errors, self._errors = self._errors, []
        if left:
            errors.append(f"{left} message(s) not delivered within {self._timeout_s:g}s")
        if errors:
            raise DeliveryFailed("Kafka did not take the dataflow's output: " + "; ".join(errors))

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
