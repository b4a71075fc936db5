"""Rate limits against real Kafka: posts over a token's or a robot's rate are answered
429 with Retry-After, counted, and never reach the topic; what fits is acknowledged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.auth import hash_token, new_token
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import ingest_client, report

FLEET, OTHER = new_token(), new_token()


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    return make_topic(1)


@pytest.fixture
def client(settings: Settings, topic: str) -> Iterator[TestClient[Any]]:
    with ingest_client(
        settings,
        topic,
        f"ingest:{hash_token(FLEET)},ingest:{hash_token(OTHER)}",
        # Slow refill, so that nothing comes back while the test runs.
        ingest_robot_rate=0.01,
        ingest_robot_burst=3,
        ingest_token_rate=0.01,
        ingest_token_burst=8,
    ) as c:
        yield c


def limited(client: TestClient[Any]) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        s.labels["limit"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "fleetpulse_ingest_reports_limited_total"
    }


def test_a_robots_and_a_tokens_excess_is_refused_before_kafka(
    client: TestClient[Any], settings: Settings, topic: str
) -> None:
    fleet = {"Authorization": f"Bearer {FLEET}"}
    # One robot: 3 fit (its burst), the 4th single post and a batch naming it are refused.
    singles = [
        client.post("/v1/reports", json=report("amr-l1", i), headers=fleet) for i in range(1, 5)
    ]
    assert [r.status_code for r in singles] == [202, 202, 202, 429]
    over = singles[3]
    assert over.json()["error"] == "rate_limited" and "robot 'amr-l1'" in over.json()["detail"]
    assert int(over.headers["retry-after"]) >= 1
    batch = client.post(
        "/v1/reports/batch", json=[report("amr-l2", 1), report("amr-l1", 9)], headers=fleet
    )
    assert batch.status_code == 429  # all or nothing: amr-l2's report is not taken either
    # The token: 8 reports in all (3 used); 5 more fit, then its limit answers.
    fits = client.post(
        "/v1/reports/batch", json=[report(f"amr-t{i}", 1) for i in range(5)], headers=fleet
    )
    assert fits.status_code == 202
    token_over = client.post("/v1/reports", json=report("amr-t9", 1), headers=fleet)
    assert token_over.status_code == 429 and "this token may post" in token_over.json()["detail"]
    # Another token has buckets of its own (robots' buckets are shared: amr-l1 stays limited).
    assert (
        client.post(
            "/v1/reports", json=report("amr-o1", 1), headers={"Authorization": f"Bearer {OTHER}"}
        ).status_code
        == 202
    )
    assert (
        client.post(
            "/v1/reports", json=report("amr-l1", 10), headers={"Authorization": f"Bearer {OTHER}"}
        ).status_code
        == 429
    )
    # On the topic: exactly what was acknowledged.
    messages = consume_all(settings, topic, expect=9)
    keys = sorted(m.key().decode() for m in messages)
    assert keys == sorted(["amr-l1"] * 3 + [f"amr-t{i}" for i in range(5)] + ["amr-o1"])
    assert all(json.loads(m.value())["robot_id"] == m.key().decode() for m in messages)
    assert limited(client) == {"robot": 1 + 2 + 1, "token": 1}
