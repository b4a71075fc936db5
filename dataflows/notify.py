"""The notifier: incident versions from the incidents topic, posted to webhook targets.

    python -m dataflows.notify          run until SIGINT/SIGTERM (the main job starts it)

Off the hot path: the dataflow writes each incident version to ``robot.incidents``
(key = robot, headers ``incident_id`` and ``rank``) and goes on; this process reads
that topic in its own consumer group and, for each version, posts it to every target
of the rules file (``targets:`` in FLEETPULSE_RULES_FILE, hot-reloaded like the rules)
that wants its severity and rule. A receiver that is slow or down delays only the
notifications, never the flow.

Each POST carries::

    Content-Type: application/json
    X-Fleetpulse-Event: incident.opened | incident.acknowledged | incident.closed
    X-Fleetpulse-Delivery: <incident id>:<rank>     the same on every retry: dedupe by it
    X-Fleetpulse-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
                            (with the target's FLEETPULSE_NOTIFY_SECRETS entry)

and the body ``{"event", "delivery", "incident": Incident}`` — or, for ``format:
slack``, ``{"text": "..."}`` as Slack's incoming webhooks take it. A 2xx is delivered;
a 5xx, 408, 429, a timeout or a refused connection is tried again after a back-off
(FLEETPULSE_NOTIFY_BACKOFF_S doubling to 30 s) up to FLEETPULSE_NOTIFY_ATTEMPTS tries,
then counted dead (``fleetpulse_notify_dead_total{target}``) and logged; any other 4xx
is dead at once. Each target has its own lanes, so one that is down delays only its
own notifications; one robot's versions reach a target in order. An offset is
committed once every delivery of it and before it is delivered or dead, so a restart
sends again at most what was in flight (with the same delivery ids).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import httpx
import msgspec
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, start_http_server

from api.signing import sign
from fleetpulse.alert_rules import Incident, RuleBook, RulesFile, Target
from fleetpulse.errors import ConfigError, FleetpulseError
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, load_settings
from observability.logs import setup_logging

__all__ = ["GROUP", "Notifier", "event_of", "main", "parse_secrets", "payload"]

log = logging.getLogger("fleetpulse.notify")

GROUP = "fleetpulse-notify"
MAX_BACKOFF_S = 30.0
_RETRY_STATUS = frozenset({408, 429})
_decoder = msgspec.json.Decoder(Incident)
_encoder = msgspec.json.Encoder()


def event_of(incident: Incident) -> str:
    """``incident.opened``, ``incident.acknowledged`` or ``incident.closed``."""
    if incident.state == "closed":
        return "incident.closed"
    return "incident.acknowledged" if incident.acknowledged_at is not None else "incident.opened"


def payload(incident: Incident, target: Target) -> bytes:
    """The body posted to ``target`` for this version of ``incident``."""
    event = event_of(incident)
    delivery = f"{incident.id}:{incident.rank}"
    if target.format == "slack":
        verb = event.split(".", 1)[1]
        when = (incident.closed_at if incident.state == "closed" else incident.opened_at) or (
            incident.opened_at
        )
        text = (
            f"[{incident.severity}] {incident.rule} {verb} for robot {incident.robot_id} "
            f"at {when.isoformat()} (incident {incident.id})"
        )
        if incident.acknowledged_by and event == "incident.acknowledged":
            text += f", by {incident.acknowledged_by}"
        return _encoder.encode({"text": text})
    return _encoder.encode({"event": event, "delivery": delivery, "incident": incident})


def parse_secrets(spec: str) -> dict[str, str]:
    """``<target>=<secret>,...`` (FLEETPULSE_NOTIFY_SECRETS) as a dict; ConfigError."""
    out: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, secret = entry.partition("=")
        if not sep or not name or not secret:
            raise ConfigError(
                f"FLEETPULSE_NOTIFY_SECRETS entry {name or entry[:8]!r}... is not "
                "`<target name>=<secret>`"
            )
        out[name] = secret
    return out


class NotifyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "fleetpulse_notify_sent", "Notifications delivered (2xx), by target.", ["target"],
            registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "fleetpulse_notify_retries", "Tries that failed and were tried again, by target.",
            ["target"], registry=registry,
        )  # fmt: skip
        self.dead = Counter(
            "fleetpulse_notify_dead",
            "Notifications given up (tries used up, or refused with a 4xx), by target.",
            ["target"], registry=registry,
        )  # fmt: skip
        self.seconds = Counter(
            "fleetpulse_notify_delivery_seconds",
            "Time from the incident version's append to its delivery, summed, by target.",
            ["target"], registry=registry,
        )  # fmt: skip


class _Offsets:
    """Which offsets of each partition are done (every delivery of them delivered or
    dead): the consumer commits up to the first that is not."""

    def __init__(self) -> None:
        self._pending: dict[int, dict[int, int]] = {}  # partition -> offset -> deliveries left
        self._committed: dict[int, int] = {}

    def add(self, partition: int, offset: int, deliveries: int) -> None:
        self._pending.setdefault(partition, {})[offset] = deliveries

    def done(self, partition: int, offset: int) -> None:
        self._pending[partition][offset] -= 1

    def ready(self) -> list[tuple[int, int]]:
        """(partition, next offset to read) for partitions that moved since last time."""
        out = []
        for partition, offsets in self._pending.items():
            upto = None
            for offset in sorted(offsets):
                if offsets[offset] > 0:
                    break
                upto = offset
                del offsets[offset]
            if upto is not None and upto + 1 > self._committed.get(partition, -1):
                self._committed[partition] = upto + 1
                out.append((partition, upto + 1))
        return out


Job = tuple[Target, Incident, float, int, int]  # target, version, appended, partition, offset


class Notifier:
    """Reads the incidents topic and delivers each version to the targets that want it.

    Each target has its own lanes (:data:`LANES` per target, a robot always in the same
    one, so its versions arrive in order), so a receiver that is down delays only its
    own notifications.
    """

    LANES = 8
    QUEUE = 10_000  # versions waiting per lane before the consumer waits

    def __init__(
        self,
        settings: Settings,
        book: RuleBook | RulesFile,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self._book = book
        self.secrets = parse_secrets(settings.notify_secrets)
        self.metrics = NotifyMetrics(registry or CollectorRegistry())
        self._stop = threading.Event()
        self._offsets = _Offsets()
        self._lanes: dict[tuple[str, int], asyncio.Queue[Job]] = {}

    @property
    def book(self) -> RuleBook:
        return self._book.current if isinstance(self._book, RulesFile) else self._book

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Consume and deliver until :meth:`stop`."""
        s = self.settings
        consumer = Consumer(
            kafka_config(
                s,
                **{
                    "group.id": GROUP,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "client.id": "fleetpulse-notify",
                },
            )
        )
        consumer.subscribe([s.topic_incidents])
        log.info("notifier reading %s (group %s)", s.topic_incidents, GROUP)
        try:
            asyncio.run(self._loop(consumer))
        finally:
            consumer.close()

    async def _loop(self, consumer: Consumer) -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(timeout=self.settings.notify_timeout_s, limits=limits) as web:
            workers: list[asyncio.Task[None]] = []
            try:
                while not self._stop.is_set():
                    batch = await asyncio.to_thread(consumer.consume, 500, 0.5)
                    for m in batch:
                        if self._usable(m):
                            await self._route(web, m, workers)
                    await self._commit(consumer)
            finally:
                for task in workers:
                    task.cancel()

    async def _commit(self, consumer: Consumer) -> None:
        ready = self._offsets.ready()
        if ready:
            topic = self.settings.topic_incidents
            parts = [TopicPartition(topic, p, o) for p, o in ready]
            await asyncio.to_thread(consumer.commit, offsets=parts, asynchronous=False)

    def _usable(self, message: Message) -> bool:
        err = message.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("incidents topic: %s", err)
        return False

    async def _route(
        self, web: httpx.AsyncClient, m: Message, workers: list[asyncio.Task[None]]
    ) -> None:
        partition, offset = m.partition() or 0, m.offset() or 0  # set on every message read
        try:
            incident = _decoder.decode(m.value() or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("incidents offset %d: not an incident (%s); skipped", offset, exc)
            self._offsets.add(partition, offset, 0)
            return
        wanted = [t for t in self.book.targets if t.wants(incident)]
        self._offsets.add(partition, offset, len(wanted))
        appended = m.timestamp()[1] / 1000
        for target in wanted:
            lane = (target.name, zlib.crc32(incident.robot_id.encode()) % self.LANES)
            queue = self._lanes.get(lane)
            if queue is None:
                queue = self._lanes[lane] = asyncio.Queue(self.QUEUE)
                workers.append(asyncio.create_task(self._work(web, queue)))
            await queue.put((target, incident, appended, partition, offset))

    async def _work(self, web: httpx.AsyncClient, queue: asyncio.Queue[Job]) -> None:
        while True:
            target, incident, appended, partition, offset = await queue.get()
            try:
                if await self.deliver(web, target, incident):
                    self.metrics.seconds.labels(target.name).inc(max(0.0, time.time() - appended))
            finally:
                self._offsets.done(partition, offset)

    async def deliver(self, web: httpx.AsyncClient, target: Target, incident: Incident) -> bool:
        """POST one version to one target, with retries; whether it was delivered."""
        body = payload(incident, target)
        headers = {
            "Content-Type": "application/json",
            "X-Fleetpulse-Event": event_of(incident),
            "X-Fleetpulse-Delivery": f"{incident.id}:{incident.rank}",
        }
        secret = self.secrets.get(target.name)
        wait = self.settings.notify_backoff_s
        problem = ""
        for attempt in range(1, self.settings.notify_attempts + 1):
            if secret is not None:
                headers["X-Fleetpulse-Signature"] = sign(secret, body)
            try:
                r = await web.post(target.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if 200 <= r.status_code < 300:
                    self.metrics.sent.labels(target.name).inc()
                    return True
                problem = f"HTTP {r.status_code}"
                if r.status_code < 500 and r.status_code not in _RETRY_STATUS:
                    break  # the receiver refuses this one: trying again will not help
            if attempt < self.settings.notify_attempts and not self._stop.is_set():
                self.metrics.retries.labels(target.name).inc()
                await asyncio.sleep(wait)
                wait = min(wait * 2, MAX_BACKOFF_S)
        self.metrics.dead.labels(target.name).inc()
        log.error(
            "notification %s:%d to %s (%s) given up: %s",
            incident.id,
            incident.rank,
            target.name,
            target.url,
            problem,
        )
        return False


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    try:
        settings = load_settings()
        setup_logging(settings, "fleetpulse-notify")
        source: RuleBook | RulesFile = (
            RulesFile(settings.rules_file).start() if settings.rules_file else RuleBook()
        )
        registry = CollectorRegistry()
        notifier = Notifier(settings, source, registry)
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.notify_metrics_port:
        start_http_server(
            settings.notify_metrics_port, addr=settings.metrics_host, registry=registry
        )
    if not notifier.book.targets:
        log.warning("no notification targets (`targets:` in FLEETPULSE_RULES_FILE) yet")

    def stop(*_: Any) -> None:
        notifier.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    notifier.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
