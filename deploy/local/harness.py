"""Run the fleet dataflow as users do (``python -m bytewax.run``), with settings of its own,
and feed it reports: shared by the integration tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from deploy.local.services import ensure_topics
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, to_env

T = TypeVar("T")
FLOW = "dataflows.fleet:build_flow()"
# An event-time origin aligned to a whole hour, two to three hours before now: inside
# the accepted range around a report's arrival (FLEETPULSE_MAX_AGE_S) whenever it runs.
BASE_TS = (int(time.time()) // 3600 - 2) * 3600


# What isolated() made in this process, so a test session can remove it at its end
# (only its own: another session may share the stack).
MADE_TOPICS: list[str] = []
MADE_PREFIXES: list[str] = []


def isolated(settings: Settings, tmp: Path, partitions: int = 12, **over: Any) -> Settings:
    """Settings with their own topics, Redis prefix and recovery folder."""
    tag = uuid.uuid4().hex[:10]
    s = msgspec.structs.replace(
        settings,
        topic_reports=f"test.{tag}.reports",
        topic_dlq=f"test.{tag}.dlq",
        topic_alerts=f"test.{tag}.alerts",
        topic_incidents=f"test.{tag}.incidents",
        redis_prefix=f"t{tag}",
        recovery_dir=str(tmp / f"recovery-{tag}"),
        kafka_partitions=partitions,
        # Tests that scrape metrics pick a free port.
        **{"snapshot_interval_s": 1, "dataflow_metrics_port": 0, **over},
    )
    admin = AdminClient(kafka_config(s))
    topics = [s.topic_reports, s.topic_dlq, s.topic_alerts, s.topic_incidents]
    # One copy on the single-node stack; the HA stack's settings ask for 3.
    ensure_topics(admin, topics, partitions, s.kafka_replication, reports_topic=s.topic_reports)
    MADE_TOPICS.extend(topics)
    MADE_PREFIXES.append(s.redis_prefix)
    return s


def remove_made(settings: Settings) -> None:
    """Delete the topics and Redis keys isolated() made in this process."""
    import redis  # the harness's users that never clean up do not need it

    if MADE_TOPICS:
        admin = AdminClient(kafka_config(settings))
        for future in admin.delete_topics(list(MADE_TOPICS), operation_timeout=30).values():
            future.result(timeout=60)
        MADE_TOPICS.clear()
    if MADE_PREFIXES:
        client = redis.Redis.from_url(settings.redis_dsn)
        try:
            for prefix in MADE_PREFIXES:
                # Keys are "<prefix>:..."; SCAN here is a test's cleanup, never a request's.
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"{prefix}*:*", count=1000):
                    batch.append(key)
                    if len(batch) == 1000:
                        client.unlink(*batch)
                        batch.clear()
                if batch:
                    client.unlink(*batch)
        finally:
            client.close()
        MADE_PREFIXES.clear()


def report(
    robot: str, seq: int, *, boot: int = 0, t: float | None = None, **over: Any
) -> dict[str, Any]:
    at = BASE_TS + (seq if t is None else t)
    ts = over.pop("ts", None) or datetime.fromtimestamp(at, UTC).isoformat()
    body: dict[str, Any] = {
        "robot_id": robot,
        "boot": boot,
        "seq": seq,
        "ts": ts,
        "status": "moving",
        "battery": max(0.0, 100.0 - seq * 0.25),
        "pose": {"x": (seq % 1000) * 0.5, "y": 0.0, "theta": 0.0},
        "speed": 0.5,
        "errors": [],
        "site": "plant-1",
    }
    body.update(over)
    return body


Headers = list[tuple[str, str | bytes | None]]


def produce(
    settings: Settings,
    items: Iterable[tuple[bytes | None, bytes] | tuple[bytes | None, bytes, Headers]],
) -> int:
    """Write (key, value) or (key, value, headers) items to the reports topic; returns
    how many."""
    producer = Producer(kafka_config(settings, **{"linger.ms": 20}))
    n = 0
    for key, value, *headers in items:
        while True:
            try:
                producer.produce(
                    settings.topic_reports,
                    key=key,
                    value=value,
                    headers=headers[0] if headers else None,
                )
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
        if n % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return n


def encoded(reports: Iterable[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(r["robot_id"].encode(), msgspec.json.encode(r)) for r in reports]


class FlowProcess:
    """``python -m bytewax.run dataflows.fleet:build_flow()`` in its own process group."""

    def __init__(
        self,
        settings: Settings,
        log: Path,
        args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
        processes: int = 0,
    ) -> None:
        """``processes`` > 0: the main job's layout instead, ``python -m dataflows.cluster
        -p processes`` (its members in this process group)."""
        env = {**os.environ, **to_env(settings), **(extra_env or {})}
        for var in ("BYTEWAX_RECOVERY_DIRECTORY", "BYTEWAX_SNAPSHOT_INTERVAL"):
            env.pop(var, None)
        self.log = log
        self._log = log.open("ab")
        run = ["dataflows.cluster", "-p", str(processes)] if processes else ["bytewax.run", FLOW]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *run, *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGINT)
        self._log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float = 30.0) -> int:
        """Wait for the process to end by itself; its exit status."""
        code = self.proc.wait(timeout_s)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def stop_group(proc: subprocess.Popen[bytes], first: signal.Signals) -> None:
    """End a child started in a session of its own, and its whole process group: ``first``,
    then SIGKILL if it is still there after 15 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, first)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def metric_total(ports: Iterable[int], prefix: str) -> float:
    """The sum of every sample on the ``/metrics`` of these ports whose line starts with
    ``prefix`` (a metric name, or a name with its labels)."""
    import httpx  # only the callers that scrape need it

    total = 0.0
    for port in ports:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
            if line.startswith(prefix) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(
    what: str, check: Callable[[], T | None], timeout_s: float, flows: Sequence[FlowProcess] = ()
) -> T:
    """Poll ``check`` until it returns something truthy; fail with the flow's log otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        for f in flows:
            if not f.alive():
                raise AssertionError(f"the dataflow exited while waiting for {what}:\n{f.output()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f.output() for f in flows)
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")
        time.sleep(0.1)


class Reporter:
    """Robots that keep reporting straight to Kafka every ``every_s`` (a thread, started
    and stopped by ``with``); ``seq`` is the newest seq sent."""

    def __init__(self, s: Settings, robots: list[str], every_s: float) -> None:
        self.s, self.robots, self.every_s = s, robots, every_s
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seq += 1
            produce(self.s, encoded([report(r, self.seq) for r in self.robots]))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
