"""The ingest producer's error callback, on real Kafka and the real app.

A fatal librdkafka error cannot be provoked on a healthy single broker, so these tests
call the producer's ``error_cb`` with the error librdkafka would pass; everything after
that (answers, readiness, the rebuilt producer, what lands in Kafka) is real.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from confluent_kafka import KafkaError
from litestar.testing import TestClient

import api.producer
from api.app import create_app
from api.producer import ReportProducer
from deploy.local.procs import free_port
from fleetpulse.schema import decode_report
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import INGEST, ingest_settings, report

FATAL = KafkaError(KafkaError._FATAL, "test fatal", fatal=True)


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    return make_topic(3)


@pytest.fixture
def producer(settings: Settings, topic: str) -> Iterator[ReportProducer]:
    p = ReportProducer(ingest_settings(settings, topic))
    yield p
    p.close()


@pytest.fixture
def client(settings: Settings, topic: str, producer: ReportProducer) -> Iterator[TestClient[Any]]:
    app = create_app(ingest_settings(settings, topic), query=False, producer=producer)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {INGEST}"
        yield c


class Lines(logging.Handler):
    """The messages one logger writes while attached."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Lines:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(logging.NOTSET)


def test_fatal_error_answers_requests_in_flight_503_and_a_rebuilt_producer_takes_over(
    client: TestClient[Any], producer: ReportProducer, settings: Settings, topic: str
) -> None:
    assert client.get("/readyz").status_code == 200
    assert producer.generation == 1

    with Lines("fleetpulse.ingest.producer") as lines, ThreadPoolExecutor(1) as pool:
        # A request in flight: its report is handed to librdkafka, not yet acknowledged
        # (linger.ms alone keeps it unsent for 2 ms; the error comes within microseconds).
        flying = pool.submit(client.post, "/v1/reports", json=report("amr-fatal", seq=1))
        deadline = time.monotonic() + 10
        while producer.in_flight() == 0:
            assert not flying.done(), flying.result().text
            assert time.monotonic() < deadline, "the report never reached the producer"
            time.sleep(0)
        producer.on_error(FATAL)
        answer = flying.result(timeout=10)

    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert answer.json()["error"] == "unavailable"
    assert "failed for good (_FATAL: test fatal)" in answer.json()["detail"]
    assert any("test fatal" in m and "1 request(s) answered 503" in m for m in lines.messages)

    # Until the new producer answers: readiness names the error, posts are refused.
    ready = client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert "_FATAL: test fatal" in ready.json()["kafka"]
    assert "rebuilding the producer" in ready.json()["kafka"]
    refused = client.post("/v1/reports", json=report("amr-fatal", seq=2))
    assert refused.status_code == 503
    assert "being rebuilt" in refused.json()["detail"]

    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.1)
    assert producer.generation == 2
    for seq in (3, 4):
        r = client.post("/v1/reports", json=report("amr-fatal", seq=seq))
        assert (r.status_code, r.json()) == (202, {"accepted": 1})
    r = client.post("/v1/reports/batch", json=[report("amr-fatal", seq=s) for s in (5, 6)])
    assert (r.status_code, r.json()) == (202, {"accepted": 2})

    # The report refused while rebuilding never reached Kafka; the 202s all did. (Seq 1
    # may or may not have landed: it was answered 503, so it was never claimed.)
    seqs = [decode_report(m.value()).seq for m in consume_all(settings, topic, expect=4)]
    assert 2 not in seqs
    assert sorted(s for s in seqs if s != 1) == [3, 4, 5, 6]


def test_non_fatal_errors_are_logged_rate_limited_and_leave_readiness_alone(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api.producer, "ERROR_LOG_INTERVAL_S", 0.5)
    producer = ReportProducer(ingest_settings(settings, topic))
    app = create_app(ingest_settings(settings, topic), query=False, producer=producer)
    transport = KafkaError(KafkaError._TRANSPORT, "test transport")
    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "test all brokers down")
    try:
        with (
            TestClient(app, raise_server_exceptions=False) as client,
            Lines("fleetpulse.ingest.producer") as lines,
        ):
            client.headers["Authorization"] = f"Bearer {INGEST}"
            for _ in range(5):
                producer.on_error(transport)
                producer.on_error(down)
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/reports", json=report("amr-ok", seq=1)).status_code == 202
            assert producer.generation == 1
            # One line per error code within the interval...
            assert len(lines.messages) == 2, lines.messages
            assert "_TRANSPORT: test transport" in lines.messages[0]
            assert "_ALL_BROKERS_DOWN: test all brokers down" in lines.messages[1]
            # ...and the next one after it says how many were left out.
            time.sleep(0.6)
            producer.on_error(transport)
            assert len(lines.messages) == 3
            assert lines.messages[2].endswith("(4 more since the last line)")
    finally:
        producer.close()


def test_librdkafka_errors_reach_the_callback(settings: Settings, topic: str) -> None:
    # Nothing listens on this port: librdkafka reports the refused connections through
    # error_cb (non-fatal), which the producer logs.
    nowhere = ingest_settings(settings, topic, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with Lines("fleetpulse.ingest.producer") as lines:
        producer = ReportProducer(nowhere)
        try:
            deadline = time.monotonic() + 15
            while not any("_TRANSPORT" in m or "_ALL_BROKERS_DOWN" in m for m in lines.messages):
                assert time.monotonic() < deadline, lines.messages
                time.sleep(0.05)
            assert producer.generation == 1
        finally:
            producer.close(timeout_s=0)


def test_an_app_whose_lifespan_runs_again_makes_its_producer_again(
    settings: Settings, topic: str
) -> None:
    # schemathesis ends an ASGI app's lifespan after each test and starts it again for
    # the next; the producer the app owns is closed with it and must come back.
    app = create_app(ingest_settings(settings, topic, produce_timeout_s=3.0), query=False)
    for seq in (1, 2):
        with TestClient(app, raise_server_exceptions=False) as client:
            client.headers["Authorization"] = f"Bearer {INGEST}"
            r = client.post("/v1/reports", json=report("amr-life", seq=seq))
            assert r.status_code == 202, r.text
    msgs = consume_all(settings, topic, expect=2)
    assert sorted(decode_report(m.value()).seq for m in msgs) == [1, 2]
