"""The local stack's three services answer through their real protocols."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
import redis
from confluent_kafka import Consumer, Producer
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.errors import StackError
from fleetpulse.settings import Settings


def test_all_three_services_are_healthy(stack: Stack) -> None:
    rows = stack.status()
    assert [(row.name, row.healthy) for row in rows] == [
        ("kafka", True),
        ("redis", True),
        ("jaeger", True),
    ]
    assert all(row.pid is not None for row in rows)
    assert [row.role for row in rows] == ["", "master, 0 replica(s)", ""]


def test_product_topics_exist_with_configured_partitions(stack: Stack, settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient

    topics = (
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
        .list_topics(timeout=10)
        .topics
    )
    for name in (settings.topic_reports, settings.topic_dlq, settings.topic_alerts):
        assert len(topics[name].partitions) == settings.kafka_partitions


def test_kafka_produce_and_consume_with_headers(
    settings: Settings, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(3)
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        delivered.append((msg.partition(), msg.offset()))  # type: ignore[attr-defined]

    producer.produce(
        topic,
        key=b"amr-7",
        value=b'{"robot_id":"amr-7","seq":1}',
        headers=[("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"), ("x", b"1")],
        on_delivery=on_delivery,
    )
    assert producer.flush(15) == 0
    assert len(delivered) == 1

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error():
                raise AssertionError(msg.error())
        assert msg is not None, "message not consumed within 30 s"
        assert msg.key() == b"amr-7"
        assert msg.value() == b'{"robot_id":"amr-7","seq":1}'
        assert dict(msg.headers()) == {
            "traceparent": b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01",
            "x": b"1",
        }
        assert (msg.partition(), msg.offset()) == delivered[0]
    finally:
        consumer.close()


def test_redis_round_trip(stack: Stack, settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_dsn)
    key = f"test:{uuid.uuid4().hex}"
    try:
        client.hset(key, mapping={"battery": "87.5", "status": "moving"})
        client.expire(key, 60)
        assert client.hgetall(key) == {b"battery": b"87.5", b"status": b"moving"}
        assert 0 < client.ttl(key) <= 60
    finally:
        client.delete(key)
    assert client.exists(key) == 0


def test_otlp_span_is_queryable_in_jaeger(stack: Stack, settings: Settings) -> None:
    service = f"fleetpulse-test-{uuid.uuid4().hex[:8]}"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_grpc_endpoint, insecure=True))
    )
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("stack-check") as span:
        span.set_attribute("robot_id", "amr-7")
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()

    deadline = time.monotonic() + 30
    traces: list[dict[str, object]] = []
    while not traces and time.monotonic() < deadline:
        r = httpx.get(f"{settings.jaeger_api}/api/traces", params={"service": service}, timeout=5)
        assert r.status_code == 200, r.text
        traces = r.json()["data"] or []
        if not traces:
            time.sleep(0.5)
    assert len(traces) == 1, f"no trace for {service} in Jaeger after 30 s"
    trace = traces[0]
    assert trace["traceID"] == trace_id
    (span_json,) = trace["spans"]  # type: ignore[index]
    assert span_json["operationName"] == "stack-check"
    tags = {t["key"]: t["value"] for t in span_json["tags"]}
    assert tags["robot_id"] == "amr-7"


def test_a_taken_port_is_reported_with_its_setting(settings: Settings, tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        s = msgspec.structs.replace(settings, stack_dir=str(tmp_path / "stack"), redis_port=port)
        with pytest.raises(StackError) as info:
            Stack(s).up(["redis"])
    assert str(info.value) == (
        f"cannot start redis: port {port} (FLEETPULSE_REDIS_PORT) is already in use by a "
        "process this stack did not start; stop that process or set FLEETPULSE_REDIS_PORT "
        "to a free port"
    )
    assert not (tmp_path / "stack" / "run" / "redis.pid").exists()


def test_up_twice_changes_nothing_and_down_stops_only_its_own(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = msgspec.structs.replace(settings, stack_dir=str(tmp_path / "stack"), redis_port=free_port())
    own = Stack(s)
    assert own.up(["redis"]) == ["redis"]
    pid = own.pidfile(own.service("redis")).running_pid()
    assert pid is not None
    assert own.up(["redis"]) == []  # already running: left alone
    assert own.pidfile(own.service("redis")).running_pid() == pid
    own.down()
    assert own.pidfile(own.service("redis")).running_pid() is None
    assert (
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )
    # The shared stack was not touched by the other stack's down.
    assert all(row.healthy for row in stack.status())
