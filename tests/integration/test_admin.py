"""POST /v1/robots/{robot_id}/reset-order: admin scope, a durable control record, an audit line."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.auth import hash_token, new_token
from fleetpulse.control import CONTROL_HEADER, control_kind, decode_control
from fleetpulse.settings import Settings
from observability.logs import JsonFormatter
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import report

INGEST, READ, ADMIN = new_token(), new_token(), new_token()
TOKENS = f"ingest:{hash_token(INGEST)},read:{hash_token(READ)},admin:{hash_token(ADMIN)}"


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    return make_topic(3)


@pytest.fixture
def admin_settings(settings: Settings, topic: str) -> Settings:
    return msgspec.structs.replace(settings, topic_reports=topic, api_tokens=TOKENS)


@pytest.fixture
def client(admin_settings: Settings) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(admin_settings, query=False), raise_server_exceptions=False) as c:
        yield c


class Records(logging.Handler):
    """The records one logger writes while attached."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(logging.NOTSET)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_reset_order_writes_a_control_record_once_kafka_has_it(
    client: TestClient[Any], settings: Settings, topic: str
) -> None:
    before = time.time()
    with Records("fleetpulse.audit") as audit:
        r = client.post("/v1/robots/amr-7/reset-order", headers=bearer(ADMIN))
    after = time.time()
    assert (r.status_code, r.json()) == (202, {"accepted": 1})

    (msg,) = consume_all(settings, topic, expect=1)
    assert msg.key() == b"amr-7"
    headers = dict(msg.headers())
    assert headers[CONTROL_HEADER] == b"reset_order"
    assert control_kind(msg.headers()) == b"reset_order"
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]", headers["traceparent"])
    assert int(before * 1000) <= int(headers["ingest_ms"]) <= int(after * 1000)
    value = json.loads(msg.value())
    assert set(value) == {"control", "robot_id", "by", "requested_at"}
    assert value["control"] == "reset_order"
    assert value["robot_id"] == "amr-7"
    assert value["by"] == hash_token(ADMIN)[:12]
    assert value["requested_at"].endswith("Z")  # RFC 3339, UTC
    assert before - 0.001 <= datetime.fromisoformat(value["requested_at"]).timestamp() <= after
    control = decode_control(msg.value())
    assert (control.control, control.robot_id, control.by) == ("reset_order", "amr-7", value["by"])

    # One audit line: who, what, from where, the outcome; the token itself never appears.
    (line,) = audit.records
    assert line.getMessage() == f"reset_order amr-7 by {value['by']} from testclient: accepted"
    logged = json.loads(JsonFormatter("fleetpulse-ingest").format(line))
    assert logged["logger"] == "fleetpulse.audit"
    assert {k: logged[k] for k in ("action", "robot_id", "by", "client", "outcome")} == {
        "action": "reset_order",
        "robot_id": "amr-7",
        "by": value["by"],
        "client": "testclient",
        "outcome": "accepted",
    }
    assert ADMIN not in json.dumps(logged)


AUTH_CASES = [
    ("no-token", {}, 401, "missing bearer token"),
    ("unknown-token", bearer("fp_not-a-real-token"), 401, "unknown bearer token"),
    ("ingest-token", bearer(INGEST), 403, "token has scope ingest; this route needs admin"),
    ("read-token", bearer(READ), 403, "token has scope read; this route needs admin"),
]


@pytest.mark.parametrize(
    ("headers", "status", "detail"), [pytest.param(*c[1:], id=c[0]) for c in AUTH_CASES]
)
def test_reset_order_needs_an_admin_token(
    client: TestClient[Any], headers: dict[str, str], status: int, detail: str
) -> None:
    r = client.post("/v1/robots/amr-7/reset-order", headers=headers)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]


BAD_IDS = [
    ("star", "amr%2A"),
    ("space", "amr%207"),
    ("brace", "amr%7B7%7D"),
    ("trailing-newline", "amr-1%0A"),
    ("leading-dash", "-amr"),
    ("65-chars", "a" * 65),
    ("non-ascii", "amr-%C3%BC"),
]


@pytest.mark.parametrize("robot_id", [pytest.param(c[1], id=c[0]) for c in BAD_IDS])
def test_reset_order_refuses_a_bad_robot_id(client: TestClient[Any], robot_id: str) -> None:
    r = client.post(f"/v1/robots/{robot_id}/reset-order", headers=bearer(ADMIN))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_parameter"
    assert r.json()["fields"] == ["robot_id"]
    assert r.json()["detail"].startswith("robot_id: ")


def test_refused_commands_never_reach_the_topic_and_scopes_stay_apart(
    client: TestClient[Any], settings: Settings, topic: str
) -> None:
    for _id, headers, status, _detail in AUTH_CASES:
        assert client.post("/v1/robots/amr-7/reset-order", headers=headers).status_code == status
    for _id, robot_id in BAD_IDS:
        r = client.post(f"/v1/robots/{robot_id}/reset-order", headers=bearer(ADMIN))
        assert r.status_code == 422
    # An admin token does not post reports; an ingest token still does.
    r = client.post("/v1/reports", json=report("amr-7"), headers=bearer(ADMIN))
    assert (r.status_code, r.json()["detail"]) == (
        403,
        "token has scope admin; this route needs ingest",
    )
    assert (
        client.post("/v1/reports", json=report("sentinel"), headers=bearer(INGEST)).status_code
        == 202
    )
    msgs = consume_all(settings, topic, expect=1)
    assert [(m.key(), control_kind(m.headers())) for m in msgs] == [(b"sentinel", None)]


def test_reset_order_is_documented(client: TestClient[Any], admin_settings: Settings) -> None:
    doc = client.get("/schema/openapi.json").json()
    op = doc["paths"]["/v1/robots/{robot_id}/reset-order"]["post"]
    assert op["security"] == [{"bearer": []}]
    assert "`admin` token" in op["description"]
    assert op["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Accepted"
    }
    for status in ("400", "401", "403", "422", "503"):
        schema = op["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, status
    (param,) = op["parameters"]
    assert (param["name"], param["in"]) == ("robot_id", "path")
    assert param["schema"]["pattern"].startswith("^[A-Za-z0-9]")
