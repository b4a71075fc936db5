"""Signed webhooks against real Kafka: a token that must sign gets its reports in only
with a good, fresh signature (either secret while rotating); refusals say why and put
nothing on the topic; other tokens are not affected."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from api.auth import hash_token, new_token
from api.signing import key_id, sign
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import ingest_client, report

SIGNER, PLAIN = new_token(), new_token()
OLD, NEW = "old-secret-" + "a" * 30, "new-secret-" + "b" * 30


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    return make_topic(1)


@pytest.fixture
def client(settings: Settings, topic: str) -> Iterator[TestClient[Any]]:
    with ingest_client(
        settings,
        topic,
        f"ingest:{hash_token(SIGNER)},ingest:{hash_token(PLAIN)}",
        webhook_secrets=f"{key_id(SIGNER)}={OLD}|{NEW}",
        webhook_tolerance_s=120,
    ) as c:
        yield c


def post(client: TestClient[Any], path: str, body: bytes, token: str, signature: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if signature is not None:
        headers["X-Fleetpulse-Signature"] = signature
    return client.post(path, content=body, headers=headers)


def test_only_well_signed_posts_of_a_signing_token_reach_kafka(
    client: TestClient[Any], settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    one = json.dumps(report("amr-s1", 1)).encode()
    batch = json.dumps([report("amr-s2", 1), report("amr-s2", 2)]).encode()
    refused: dict[str, Any] = {}
    with caplog.at_level(logging.DEBUG):
        # Refused: unsigned, stale, wrong secret, signed over other bytes; single and batch.
        refused["unsigned"] = post(client, "/v1/reports", one, SIGNER, None)
        refused["stale"] = post(
            client, "/v1/reports", one, SIGNER, sign(OLD, one, int(time.time()) - 121)
        )
        refused["wrong"] = post(client, "/v1/reports", one, SIGNER, sign("c" * 40, one))
        refused["tampered"] = post(client, "/v1/reports/batch", batch, SIGNER, sign(OLD, one))
        refused["batch-unsigned"] = post(client, "/v1/reports/batch", batch, SIGNER, None)
        # Accepted: either active secret; the other token signs nothing.
        ok_old = post(client, "/v1/reports", one, SIGNER, sign(OLD, one))
        ok_new = post(client, "/v1/reports/batch", batch, SIGNER, sign(NEW, batch))
        ok_plain = post(
            client, "/v1/reports", json.dumps(report("amr-s3", 1)).encode(), PLAIN, None
        )
    reasons = {
        name: (r.status_code, r.json()["error"], r.json()["detail"]) for name, r in refused.items()
    }
    assert {name: r[:2] for name, r in reasons.items()} == dict.fromkeys(
        refused, (401, "bad_signature")
    )
    assert "X-Fleetpulse-Signature is missing" in reasons["unsigned"][2]
    assert "outside the replay window of ±120 s" in reasons["stale"][2]
    assert "does not match" in reasons["wrong"][2] and "does not match" in reasons["tampered"][2]
    assert refused["unsigned"].headers["www-authenticate"].startswith("Bearer")
    assert [r.status_code for r in (ok_old, ok_new, ok_plain)] == [202, 202, 202]
    # Exactly the accepted reports are on the topic.
    messages = consume_all(settings, topic, expect=4)
    got = sorted((m.key().decode(), json.loads(m.value())["seq"]) for m in messages)
    assert got == [("amr-s1", 1), ("amr-s2", 1), ("amr-s2", 2), ("amr-s3", 1)]
    # No secret and no signature in what the server logged.
    for secret in (OLD, NEW, sign(OLD, one).split("v1=")[1]):
        assert secret not in caplog.text
