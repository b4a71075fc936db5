"""Durable produce for ingest: an idempotent acks=all producer awaited without blocking.

librdkafka calls the delivery callback from ``poll()``, which a background thread runs;
the callback resolves an asyncio future through ``call_soon_threadsafe``. A batch of
reports shares one future (a countdown), so 1,000 reports cost one loop wake-up.

A 202 is answered only after every report of the request has its delivery report
with no error. The producer's ``message.timeout.ms`` equals the answer bound, so a
report we time out on is one librdkafka also gives up on, instead of landing later.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fleetpulse.errors import BrokerUnavailable, ReportRejected
from fleetpulse.settings import Settings

__all__ = ["OutgoingReport", "ReportProducer", "producer_config"]

# (key, value, headers)
OutgoingReport = tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]

# Errors that mean "this message can never be written", as opposed to "not now".
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.INVALID_RECORD,
}


def producer_config(settings: Settings) -> dict[str, Any]:
    """The idempotent, acks=all producer configuration shared by ingest and tools."""
    timeout_ms = max(1, int(settings.produce_timeout_s * 1000))
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "compression.type": "lz4",
        "queue.buffering.max.messages": settings.producer_queue_max,
        "message.timeout.ms": timeout_ms,
        "request.timeout.ms": min(timeout_ms, 30_000),
        "socket.timeout.ms": 3000,
    }


class _Countdown:
    """One request's outstanding deliveries; resolves its future once, on the loop."""

    __slots__ = ("error", "future", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        # A request that timed out no longer awaits; mark a late failure as seen.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.remaining = n
        self.error: KafkaError | None = None

    def delivered(self, err: KafkaError | None, _msg: Message) -> None:
        # Runs on the poll thread; only that thread writes remaining/error.
        self.remaining -= 1
        if err is not None and self.error is None:
            self.error = err
            self.loop.call_soon_threadsafe(self._resolve)
        elif self.remaining == 0 and self.error is None:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(KafkaException(self.error))
        elif self.remaining == 0:
            self.future.set_result(None)


class ReportProducer:
    """Sends validated reports to the reports topic and awaits Kafka's acknowledgement."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic_reports
        self._producer = Producer(producer_config(settings))
        self._closing = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.05)

    async def send(self, reports: Sequence[OutgoingReport]) -> None:
        """Make every report durable, or raise.

        Raises BrokerUnavailable (queue full, no confirmation within
        ``produce_timeout_s``, or a transient broker error) and ReportRejected
        (Kafka refused a report for good). On either, the request is not acknowledged.
        """
        countdown = _Countdown(asyncio.get_running_loop(), len(reports))
        try:
            for key, value, headers in reports:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=countdown.delivered,
                )
        except BufferError:
            raise BrokerUnavailable(
                f"the producer queue is full ({self.settings.producer_queue_max} reports)"
            ) from None
        except KafkaException as exc:
            raise BrokerUnavailable(f"Kafka refused the produce call: {exc}") from None
        try:
            await asyncio.wait_for(
                asyncio.shield(countdown.future), timeout=self.settings.produce_timeout_s
            )
        except TimeoutError:
            raise BrokerUnavailable(self._timed_out()) from None
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError._MSG_TIMED_OUT:  # librdkafka's side of the same bound
                raise BrokerUnavailable(self._timed_out()) from None
            if err.code() in _PERMANENT:
                raise ReportRejected(f"Kafka rejected the report: {err.str()}") from None
            raise BrokerUnavailable(f"Kafka did not confirm: {err.str()}") from None

    def _timed_out(self) -> str:
        return f"Kafka did not confirm within {self.settings.produce_timeout_s:g}s; retry later"

    def ready(self, timeout_s: float = 2.0) -> str | None:
        """None when the broker answers and the topic exists, else what is wrong (blocking)."""
        try:
            meta = self._producer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException as exc:
            return f"Kafka unreachable: {exc}"
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            return f"topic {self.topic} unavailable: {topic.error if topic else 'missing'}"
        return None

    def close(self, timeout_s: float = 10.0) -> int:
        """Deliver what is queued (up to ``timeout_s``) and stop; returns what was left."""
        self._closing.set()
        self._poller.join()
        left: int = self._producer.flush(timeout_s)
        return left
