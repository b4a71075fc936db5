"""The API keeps its OpenAPI promise: schemathesis over every query route and the
ingest server's admin route.

Generated requests (valid and invalid) go to the in-process ASGI app on real Redis
with a seeded fleet (so the documented examples, e.g. robot ``amr-7``, answer 200);
every response must be documented, match its schema, and never be a 5xx. The event
stream never ends, so it is left to test_stream.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from litestar.testing import TestClient
from schemathesis import GenerationMode
from schemathesis.python import asgi

from api.app import create_app
from api.auth import hash_token, new_token
from deploy.local.harness import isolated
from fleetpulse.settings import Settings
from tests.integration.test_query_api import READ, Fleet, private_fleet
from tests.integration.test_state_contract import alert, live, window

pytestmark = pytest.mark.integration

INGEST_TOKEN = new_token()


def fuzzed(examples: int) -> Any:
    """Hypothesis settings of these runs: ``examples`` cases, the same ones every run."""
    return hsettings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


QUERY_OPERATIONS = {
    "/v1/robots",
    "/v1/robots/{robot_id}",
    "/v1/robots/{robot_id}/history",
    "/v1/robots/{robot_id}/stats",
    "/v1/fleet/summary",
    "/v1/alerts",
}


def seed(fleet: Fleet) -> None:
    """What the schema runs read: 11 robots at plant-1 (amr-7 low and charging), two
    alerts, three of amr-7's windows."""
    fleet.write(
        [live("amr-7", 3, site="plant-1", status="charging", battery=12.0)]
        + [live(f"amr-{i}", i, site="plant-1") for i in range(10)],
        alerts=[alert("amr-7", "low_battery", 3), alert("amr-3", "error", 3)],
    )
    fleet.writer.write([], [window("amr-7", m) for m in range(3)], [])


@pytest.fixture(scope="module")
def api_schema(stack: object, settings: Settings) -> Iterator[Any]:
    """The app's own OpenAPI document, loaded by schemathesis, on a seeded fleet."""
    with private_fleet(settings) as fleet:
        seed(fleet)
        app = create_app(fleet.settings, ingest=False)
        try:
            yield schemathesis.openapi.from_asgi("/schema/openapi.json", app)
        finally:
            asgi.shutdown_lifespans()  # the app's Redis client and hub, before the keys go


# schemathesis.pytest.from_fixture (its lazy loader) reads pytest's private
# `node._nodeid`, gone in pytest 9; its documented Hypothesis strategies do the same job.
CASES = [
    pytest.param(path, mode, known, id=f"{mode}{'-known-robot' if known else ''}-{path}")
    for path in sorted(QUERY_OPERATIONS)
    for mode, known in [
        (GenerationMode.POSITIVE, False),
        (GenerationMode.POSITIVE, True),
        (GenerationMode.NEGATIVE, False),
    ]
    if not known or "{robot_id}" in path
]


def _on_the_wire(case: Any) -> bool:
    """Whether every query value can be sent as such: a negative case whose violation is
    a list, an object or null in the query is sent without it (a valid request that the
    server rightly accepts, which schemathesis would then count as a leniency)."""
    return all(
        not isinstance(v, list | dict) and v is not None for v in (case.query or {}).values()
    )


@pytest.mark.parametrize(("path", "mode", "known_robot"), CASES)
def test_query_routes_conform_to_their_openapi(
    api_schema: Any, path: str, mode: GenerationMode, known_robot: bool
) -> None:
    operation = api_schema[path]["GET"]
    fixed = {"robot_id": "amr-7"} if known_robot else None
    statuses: list[int] = []

    @given(case=operation.as_strategy(mode, path_parameters=fixed).filter(_on_the_wire))
    @fuzzed(25)
    def check(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {READ}"})
        statuses.append(response.status_code)

    check()
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE and (known_robot or "{robot_id}" not in path):
        assert 200 in statuses  # the happy path really ran
    if mode is GenerationMode.NEGATIVE:  # schema-violating parameters or credentials
        assert {401, 422} & set(statuses)


ADMIN = new_token()
RESET_ORDER = "/v1/robots/{robot_id}/reset-order"


@pytest.fixture(scope="module")
def ingest_schema(
    stack: object, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The ingest server's OpenAPI document, loaded by schemathesis, on topics of its own."""
    own = isolated(settings, tmp_path_factory.mktemp("openapi"), partitions=1)
    tokens = f"admin:{hash_token(ADMIN)},ingest:{hash_token(INGEST_TOKEN)}"
    app = create_app(msgspec.structs.replace(own, api_tokens=tokens), query=False)
    try:
        yield schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_reset_order_conforms_to_its_openapi(ingest_schema: Any, mode: GenerationMode) -> None:
    operation = ingest_schema[RESET_ORDER]["POST"]
    statuses: list[int] = []

    @given(case=operation.as_strategy(mode))
    @fuzzed(25)
    def check(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"})
        statuses.append(response.status_code)

    check()
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        assert set(statuses) == {202}  # every valid robot id is a command written to Kafka
    else:
        assert 422 in statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/reports", "/v1/reports/batch"])
def test_report_posts_conform_to_their_openapi(
    ingest_schema: Any, path: str, mode: GenerationMode
) -> None:
    # The body is documented (required, RobotReport or a list of them), so a post
    # without one is no longer schema-valid; every answer is documented, none a 5xx.
    doc = ingest_schema.raw_schema["paths"][path]["post"]
    assert doc["requestBody"]["required"] is True
    assert "429" in doc["responses"] and "401" in doc["responses"]
    operation = ingest_schema[path]["POST"]
    statuses: list[int] = []

    @given(case=operation.as_strategy(mode))
    @fuzzed(30)
    def check(case: Any) -> None:
        if mode is GenerationMode.POSITIVE:
            # A schema cannot say "within FLEETPULSE_MAX_AGE_S of the server's clock":
            # valid reports get a current ts (any other is a documented 422 naming `ts`).
            # Everything else goes as generated (a `seq` of 7.0 included: JSON Schema's
            # integer admits it, and so does the decoder).
            now = datetime.now(UTC).isoformat()
            for item in case.body if isinstance(case.body, list) else [case.body]:
                item["ts"] = now
        response = case.call_and_validate(headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
        statuses.append(response.status_code)

    check()
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        assert set(statuses) <= {202, 413}  # 413: a generated body over the size limit
    else:
        assert set(statuses) <= {400, 401, 413, 415, 422}  # 401: a mangled Authorization


def test_openapi_types_every_query_route(stack: object, settings: Settings) -> None:
    with (
        private_fleet(settings) as fleet,
        TestClient(create_app(fleet.settings, ingest=False)) as c,
    ):
        doc = c.get("/schema/openapi.json").json()
    paths = doc["paths"]
    assert QUERY_OPERATIONS | {"/v1/stream"} <= set(paths)
    ok = {
        "/v1/robots": "RobotPage",
        "/v1/robots/{robot_id}": "LiveState",
        "/v1/robots/{robot_id}/history": "ReportList",
        "/v1/robots/{robot_id}/stats": "WindowList",
        "/v1/fleet/summary": "FleetSummary",
        "/v1/alerts": "AlertList",
    }
    for path, name in ok.items():
        op = paths[path]["get"]
        assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
        for status in ("401", "403", "422"):
            body = op["responses"][status]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
        assert op["security"] == [{"bearer": []}]
    for path in (
        "/v1/robots/{robot_id}",
        "/v1/robots/{robot_id}/history",
        "/v1/robots/{robot_id}/stats",
    ):
        assert "404" in paths[path]["get"]["responses"]
    stream = paths["/v1/stream"]["get"]
    assert list(stream["responses"]["200"]["content"]) == ["text/event-stream"]
    assert {p["name"] for p in stream["parameters"]} == {"last_event_id", "Last-Event-ID"}
    # What the server checks is in the document (schemathesis found both missing): the
    # event id's form, and `since` as an RFC 3339 time with an offset, not a number.
    # (Litestar puts a nullable parameter's constraints beside its `oneOf`.)
    for p in stream["parameters"]:
        assert p["schema"]["pattern"] == r"^\d{1,20}(-\d{1,20})?$", p
    since = next(p for p in paths["/v1/alerts"]["get"]["parameters"] if p["name"] == "since")
    assert {"type": "string", "format": "date-time"} in since["schema"]["oneOf"]
    assert since["schema"]["pattern"].startswith("^\\d{4}-")
    params = {p["name"]: p["schema"] for p in paths["/v1/robots"]["get"]["parameters"]}
    assert params["limit"]["minimum"] == 1 and params["limit"]["maximum"] == 1000
    assert set(params) == {"status", "site", "online", "battery_lt", "cursor", "limit"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["LiveState"]["required"]) == {
        "report",
        "last_seen",
        "online",
        "status_since",
    }
    assert schemas["RobotPage"]["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/LiveState"
    }
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
