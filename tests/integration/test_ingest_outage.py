"""Ingest while its broker goes away and comes back (a private Kafka, not the shared one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from api.app import create_app
from deploy.local.procs import free_port
from deploy.local.services import Kafka, ensure_topics
from deploy.local.stack import Stack
from fleetpulse.errors import StackError
from fleetpulse.schema import decode_report
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import INGEST, ingest_settings, report

BOUND_S = 2.0


@pytest.fixture
def private_kafka(stack: Stack, settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """A second single-node Kafka in a temporary folder, sharing the provisioned jars."""
    own = msgspec.structs.replace(
        settings,
        stack_dir=str(tmp_path / "stack"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        kafka_bootstrap=None,
        kafka_heap_mb=512,
    )
    private = Stack(own)
    jars = Kafka(settings, stack.root).libs
    (private.root / "kafka").mkdir(parents=True)
    (private.root / "kafka" / jars.name).symlink_to(jars)
    try:
        private.up(["kafka"])
    except StackError as exc:
        pytest.fail(f"the private Kafka could not start:\n{exc}", pytrace=False)
    yield private
    private.down()


def test_broker_down_gives_503_within_the_bound_and_recovers_without_duplicates(
    private_kafka: Stack,
) -> None:
    own = ingest_settings(private_kafka.settings, "outage", produce_timeout_s=BOUND_S)
    kafka = private_kafka.service("kafka")
    assert isinstance(kafka, Kafka)
    ensure_topics(kafka._admin(), ["outage"], partitions=3, replication=1, reports_topic="outage")
    accepted: list[int] = []
    with TestClient(create_app(own, query=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {INGEST}"

        def post(seq: int) -> Any:
            r = client.post("/v1/reports", json=report("amr-outage", seq=seq))
            if r.status_code == 202:
                accepted.append(seq)
            return r

        assert post(1).status_code == 202

        private_kafka.pidfile(kafka).stop()
        started = time.monotonic()
        r = post(2)
        elapsed = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "unavailable"
        assert f"did not confirm within {BOUND_S:g}s" in r.json()["detail"]
        assert BOUND_S <= elapsed < BOUND_S + 1.5
        r = client.post("/v1/reports/batch", json=[report("amr-outage", seq=s) for s in (3, 4, 5)])
        assert r.status_code == 503
        assert client.get("/readyz").status_code == 503

        private_kafka.up(["kafka"])
        deadline = time.monotonic() + 60
        seq = 6
        while time.monotonic() < deadline:
            if post(seq).status_code == 202:
                break
            seq += 1
        else:
            pytest.fail("ingest did not accept again within 60 s of the broker's return")
        for more in range(seq + 1, seq + 20):
            assert post(more).status_code == 202
        assert client.get("/readyz").status_code == 200

    msgs = consume_all(own, "outage", expect=len(accepted), timeout_s=30)
    seqs = [decode_report(m.value()).seq for m in msgs]
    # Every acknowledged report is there exactly once; nothing is duplicated.
    assert sorted(set(seqs)) == sorted(seqs), f"duplicates: {seqs}"
    assert set(accepted) <= set(seqs)
