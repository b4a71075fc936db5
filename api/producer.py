"""Durable produce for ingest: an idempotent acks=all producer awaited without blocking.

librdkafka calls the delivery callbacks from ``poll()``, which a background thread runs.
The callbacks only count (a request's reports share one countdown); after each poll the
requests it completed are settled on their event loop by one ``call_soon_threadsafe``,
so one Kafka answer for many concurrent requests (or a batch of 1,000) costs one loop
wake-up, not one per report. The answer bound is a timer on the loop per request; the
handler awaits its future directly (no ``wait_for``/``shield`` wrappers).

A 202 is answered only after every report of the request has its delivery report
with no error. The producer's ``message.timeout.ms`` equals the answer bound, so a
report we time out on is one librdkafka also gives up on, instead of landing later.

Producer errors (librdkafka's ``error_cb``):

* non-fatal ones (``_TRANSPORT``, ``_ALL_BROKERS_DOWN``, ...) are librdkafka retrying
  on its own: they are logged, at most once per :data:`ERROR_LOG_INTERVAL_S` per error
  code, and change nothing else (readiness probes the broker itself);
* a fatal one (``err.fatal()``, e.g. the idempotent producer's sequence was broken)
  means this producer will never deliver again. Every request waiting on it is answered
  503 at once (never a 202 for a report it may not have written), new requests get 503,
  ``/readyz`` names the error, and the poll thread builds a new ``Producer``; once that
  one answers the broker it takes over and readiness returns. Rebuilds back off
  (1 s, doubling up to 30 s) when fatal errors follow each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fleetpulse.errors import BrokerUnavailable, ReportRejected
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings

__all__ = ["ERROR_LOG_INTERVAL_S", "OutgoingReport", "ReportProducer", "producer_config"]

log = logging.getLogger("fleetpulse.ingest.producer")

# (key, value, headers)
OutgoingReport = tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]

# Errors that mean "this message can never be written", as opposed to "not now".
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.INVALID_RECORD,
}

ERROR_LOG_INTERVAL_S = 10.0  # at most one log line per non-fatal error code per interval
REBUILD_FIRST_S = 1.0  # delay before the first rebuild after a fatal error
REBUILD_MAX_S = 30.0  # cap of the doubling delay when fatal errors follow each other
PROBE_TIMEOUT_S = 2.0
# How long one poll waits for librdkafka's events. It returns as soon as there are any,
# so this bounds only how quickly the thread notices a stop or a due rebuild.
POLL_S = 0.05


def producer_config(settings: Settings) -> dict[str, Any]:
    """The idempotent, acks=all producer configuration shared by ingest and tools."""
    timeout_ms = max(1, int(settings.produce_timeout_s * 1000))
    return kafka_config(
        settings,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "compression.type": "lz4",
            "queue.buffering.max.messages": settings.producer_queue_max,
            "message.timeout.ms": timeout_ms,
            "request.timeout.ms": min(timeout_ms, 30_000),
            "socket.timeout.ms": 3000,
        },
    )


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    # A closed loop (the app stopped) has nobody awaiting the answer any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class _Countdown:
    """One request's outstanding deliveries; resolves its future once, on the loop."""

    __slots__ = ("done", "error", "future", "loop", "remaining", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, done: list[_Countdown]) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.remaining = n
        self.error: KafkaError | None = None
        self.done = done  # the poll thread's list of countdowns to settle after this poll
        self.timer: asyncio.TimerHandle | None = None

    def delivered(self, err: KafkaError | None, _msg: Message) -> None:
        # Runs on the thread serving librdkafka's callbacks; only it writes remaining/error.
        self.remaining -= 1
        if err is not None and self.error is None:
            self.error = err
            self.done.append(self)
        elif self.remaining == 0 and self.error is None:
            self.done.append(self)

    def fail(self, reason: str) -> None:
        """Answer the request 503 whatever its deliveries say (any thread)."""
        _call_soon(self.loop, self._fail, reason)

    def _fail(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(BrokerUnavailable(reason))

    def expire(self, reason: str) -> None:
        """On the loop, at the answer bound: 503 unless Kafka answered first."""
        self._fail(reason)

    def settle(self) -> None:
        """On the loop: the answer its deliveries give."""
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(KafkaException(self.error))
        elif self.remaining == 0:
            self.future.set_result(None)


def _settle(done: list[_Countdown]) -> None:
    for countdown in done:
        countdown.settle()


def _wake(done: list[_Countdown]) -> None:
    """Settle (and empty) ``done``, the countdowns that one poll completed: one wake-up per
    event loop, not one per delivery (a wake-up is a write to the loop's self-pipe, a loop
    turn and, from the poll thread, a hand-over of the GIL)."""
    batch = done[:]
    done.clear()  # the same list: countdowns keep a reference to it
    loop = batch[0].loop
    if all(c.loop is loop for c in batch):
        _call_soon(loop, _settle, batch)
        return
    by_loop: dict[asyncio.AbstractEventLoop, list[_Countdown]] = {}
    for countdown in batch:
        by_loop.setdefault(countdown.loop, []).append(countdown)
    for each, countdowns in by_loop.items():
        _call_soon(each, _settle, countdowns)


class _Generation:
    """One librdkafka producer and the requests waiting on it."""

    __slots__ = ("failed", "number", "pending", "producer")

    def __init__(self, number: int) -> None:
        self.number = number
        self.producer: Producer | None = None  # set right after, once error_cb can name us
        self.pending: set[_Countdown] = set()
        self.failed: str | None = None  # why it will never deliver again

    @property
    def client(self) -> Producer:
        assert self.producer is not None
        return self.producer


class _ErrorLog:
    """Logs non-fatal producer errors at most once per code per interval, with a count."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[int, float] = {}
        self._suppressed: dict[int, int] = {}
        self._lock = threading.Lock()

    def note(self, err: KafkaError) -> None:
        now = time.monotonic()
        code = err.code()
        with self._lock:
            if now - self._last.get(code, -self.interval_s) < self.interval_s:
                self._suppressed[code] = self._suppressed.get(code, 0) + 1
                return
            self._last[code] = now
            suppressed = self._suppressed.pop(code, 0)
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        log.warning("Kafka producer error %s: %s%s", err.name(), err.str(), more)


class ReportProducer:
    """Sends validated reports to the reports topic and awaits Kafka's acknowledgement."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic_reports
        self._timeout_reason = self._timed_out()
        self._lock = threading.Lock()  # guards _gen, _candidate and every generation's fields
        self._errors = _ErrorLog(ERROR_LOG_INTERVAL_S)
        self._gen = self._new_generation(1)
        self._candidate: _Generation | None = None  # the rebuild, until it answers
        self._rebuild_at = 0.0
        self._rebuild_delay_s = REBUILD_FIRST_S
        self._last_fatal = -float("inf")
        self._probe_problem = ""
        # Countdowns whose deliveries are all in (or failed), filled by the delivery
        # callbacks during one poll and settled on their loops with one wake-up each.
        self._done: list[_Countdown] = []
        self._closing = threading.Event()
        self._poller = self._start_poller()

    def _start_poller(self) -> threading.Thread:
        poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        poller.start()
        return poller

    def start(self) -> None:
        """After :meth:`close`: a new producer and poll thread (an ASGI server may run an
        app's lifespan more than once); a no-op while running."""
        if self._poller.is_alive():
            return
        with self._lock:
            self._gen = self._new_generation(self._gen.number + 1)
            self._candidate = None
            self._probe_problem = ""
        self._closing.clear()
        self._poller = self._start_poller()

    @property
    def generation(self) -> int:
        """How many producers this one has been through: 1, plus one per rebuild or restart."""
        return self._gen.number

    def in_flight(self) -> int:
        """Messages the current producer holds unconfirmed (queued or sent)."""
        return len(self._gen.client)

    def _new_generation(self, number: int) -> _Generation:
        gen = _Generation(number)
        config = {
            **producer_config(self.settings),
            "error_cb": functools.partial(self._on_error, gen),
        }
        gen.producer = Producer(config)
        return gen

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb`` for the current producer (also callable in tests)."""
        self._on_error(self._gen, err)

    def _on_error(self, gen: _Generation, err: KafkaError) -> None:
        if not err.fatal():
            self._errors.note(err)
            return
        reason = f"the Kafka producer failed for good ({err.name()}: {err.str()})"
        with self._lock:
            if gen.failed is not None:
                return
            gen.failed = reason
            waiting = list(gen.pending)
            gen.pending.clear()
            if gen is self._gen:
                now = time.monotonic()
                quick = now - self._last_fatal < 60.0
                self._rebuild_delay_s = (
                    min(REBUILD_MAX_S, self._rebuild_delay_s * 2) if quick else REBUILD_FIRST_S
                )
                self._last_fatal = now
                self._rebuild_at = now + self._rebuild_delay_s
        log.error(
            "%s; producer %d: %d request(s) answered 503, rebuilding in %.0f s",
            reason,
            gen.number,
            len(waiting),
            self._rebuild_delay_s,
        )
        for countdown in waiting:
            countdown.fail(f"{reason}; not acknowledged, retry later")

    def _poll(self) -> None:
        while not self._closing.is_set():
            gen, candidate = self._gen, self._candidate
            gen.client.poll(POLL_S)
            if candidate is not None:
                candidate.client.poll(0)
            if self._done:
                _wake(self._done)
            if gen.failed is not None and time.monotonic() >= self._rebuild_at:
                self._rebuild(gen)

    def _rebuild(self, failed: _Generation) -> None:
        """On the poll thread: make a new producer; it takes over once it answers."""
        if self._candidate is None or self._candidate.failed is not None:
            if self._candidate is None:
                # The requests on it are answered already; what it still holds is dropped.
                failed.client.purge()
                failed.client.poll(0)
            self._candidate = self._new_generation(failed.number + 1)
        problem = self._probe(self._candidate.client)
        if problem is not None:
            self._probe_problem = f"; the new producer does not answer yet: {problem}"
            self._rebuild_at = time.monotonic() + min(REBUILD_MAX_S, self._rebuild_delay_s)
            return
        with self._lock:
            self._gen, self._candidate = self._candidate, None
            self._probe_problem = ""
        log.warning("Kafka producer %d rebuilt; ingest accepts reports again", self._gen.number)

    def _probe(self, producer: Producer, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        try:
            meta = producer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException as exc:
            return f"Kafka unreachable: {exc}"
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            return f"topic {self.topic} unavailable: {topic.error if topic else 'missing'}"
        return None

    async def send(self, reports: Sequence[OutgoingReport]) -> None:
        """Make every report durable, or raise.

        Raises BrokerUnavailable (queue full, no confirmation within
        ``produce_timeout_s``, a transient broker error, or a fatal producer error) and
        ReportRejected (Kafka refused a report for good). On either, the request is not
        acknowledged.
        """
        loop = asyncio.get_running_loop()
        countdown = _Countdown(loop, len(reports), self._done)
        with self._lock:
            gen = self._gen
            if gen.failed is not None:
                raise BrokerUnavailable(f"{gen.failed}; it is being rebuilt, retry later")
            gen.pending.add(countdown)
        try:
            self._produce(gen.client, countdown, reports)
            countdown.timer = loop.call_later(
                self.settings.produce_timeout_s, countdown.expire, self._timeout_reason
            )
            await countdown.future
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError._MSG_TIMED_OUT:  # librdkafka's side of the same bound
                raise BrokerUnavailable(self._timed_out()) from None
            if err.code() in _PERMANENT:
                raise ReportRejected(f"Kafka rejected the report: {err.str()}") from None
            raise BrokerUnavailable(f"Kafka did not confirm: {err.str()}") from None
        finally:
            if countdown.timer is not None:
                countdown.timer.cancel()
            # Nobody awaits it any more (answered, failed to produce, cancelled): a late
            # delivery then finds it done instead of leaving an unretrieved exception.
            countdown.future.cancel()
            with self._lock:
                gen.pending.discard(countdown)

    def _produce(
        self, producer: Producer, countdown: _Countdown, reports: Sequence[OutgoingReport]
    ) -> None:
        try:
            for key, value, headers in reports:
                producer.produce(
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

    def _timed_out(self) -> str:
        return f"Kafka did not confirm within {self.settings.produce_timeout_s:g}s; retry later"

    def ready(self, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        """None when the broker answers and the topic exists, else what is wrong (blocking).

        After a fatal error: what it was, until the rebuilt producer answers.
        """
        with self._lock:
            gen, probe = self._gen, self._probe_problem
        if gen.failed is not None:
            return f"{gen.failed}; rebuilding the producer{probe}"
        return self._probe(gen.client, timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        """Deliver what is queued (up to ``timeout_s``) and stop; returns what was left."""
        self._closing.set()
        self._poller.join()
        if self._gen.failed is not None:
            self._gen.client.purge()  # it will never deliver; its requests are answered
        left: int = self._gen.client.flush(timeout_s)
        if self._done:  # deliveries flush() served: their requests may still be waiting
            _wake(self._done)
        return left
