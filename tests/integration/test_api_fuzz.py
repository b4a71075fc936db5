"""Both servers keep their OpenAPI promise, black-box: schemathesis over HTTP against
`python -m api.serve ingest` and `python -m api.serve query`, as users run them.

Every check schemathesis has, both modes, a fixed seed and case count
(:mod:`deploy.local.fuzz`, also `just fuzz-api`): the report posts with an ingest token
(on topics of their own), reset-order with an admin token, every query route with a read
token on a seeded fleet (so the documented robot `amr-7` answers 200). Below the runs,
each finding they made is kept as the exact request that showed it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
import msgspec
import pytest

from api.auth import hash_token, new_token
from deploy.local.fuzz import Run, run, targets
from deploy.local.harness import isolated
from fleetpulse.control import ACK, RESET_ORDER, RETIRE, control_kind
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all
from tests.integration.test_openapi import seed
from tests.integration.test_query_api import INGEST, READ, private_fleet
from tests.integration.test_stream import api_server

pytestmark = pytest.mark.integration

ADMIN = new_token()
EXAMPLES = 250  # cases per operation: with the servers' start, about a minute and a half
SEED = 17


class Servers(NamedTuple):
    ingest: str
    query: str
    ingest_settings: Settings  # its topics


@pytest.fixture(scope="module")
def servers(
    stack: object, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """Both servers on free ports: ingest on topics of its own (ingest and admin tokens),
    query on a seeded fleet (the read token)."""
    own = isolated(settings, tmp_path_factory.mktemp("fuzz"), partitions=1)
    tokens = f"admin:{hash_token(ADMIN)},ingest:{hash_token(INGEST)}"
    with private_fleet(settings) as fleet:
        seed(fleet)
        with (
            api_server(msgspec.structs.replace(own, api_tokens=tokens), "ingest", 1) as ingest,
            api_server(fleet.settings, "query", 1) as query,
        ):
            yield Servers(ingest, query, own)


@pytest.fixture(scope="module")
def runs(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    report_dir = tmp_path_factory.mktemp("schemathesis")
    every = targets(servers.ingest, servers.query, READ, INGEST, ADMIN)
    return {t.name: run(t, report_dir, EXAMPLES, SEED) for t in every}


def answered(result: Run) -> Counter[tuple[str, int]]:
    """How often each (route, status) was answered; a robot id in a path reads {id}."""
    out: Counter[tuple[str, int]] = Counter()
    for _method, path, status, _body in result.answers:
        parts = path.split("/")
        if len(parts) > 3 and parts[2] == "robots":
            parts[3] = "{id}" if parts[3] != "amr-7" else "amr-7"
        out["/".join(parts), status] += 1
    return out


def clean(result: Run) -> None:
    """Nothing found: exit status 0, no failure or error in the report."""
    assert result.returncode == 0, result.output
    assert " FAILURES " not in result.output and " ERRORS " not in result.output, result.output
    assert " passed" in result.output.split(" SUMMARY ")[-1], result.output


def test_the_ingest_server_keeps_its_openapi_promise(runs: dict[str, Run]) -> None:
    result = runs["ingest"]
    clean(result)
    seen = answered(result)
    # The happy path ran on both posts (schema-valid reports go to Kafka) and the
    # refusals did too: bad bodies, a missing or mangled token, a wrong media type.
    for path in ("/v1/reports", "/v1/reports/batch"):
        assert seen[path, 202] >= 10, seen
        assert seen[path, 422] >= 10, seen
        assert seen[path, 401] >= 1, seen
    assert seen["/v1/reports/batch", 413] >= 1, seen  # a batch over maxItems
    assert seen["/readyz", 200] >= 1 and seen["/metrics", 200] >= 1, seen
    assert max(a.status for a in result.answers) < 500


def test_what_the_runs_were_told_is_durable_is_in_kafka(
    servers: Servers, runs: dict[str, Run]
) -> None:
    # Every 202 of the runs is a promise (acks=all): the accepted reports and the reset
    # commands are on the topic, exactly those.
    reports = sum(
        json.loads(a.body)["accepted"]
        for a in runs["ingest"].answers
        if a.status == 202 and a.path.startswith("/v1/reports")
    )
    commands = Counter(
        a.path.rsplit("/", 1)[-1].encode().replace(b"-", b"_")
        for a in runs["admin"].answers
        if a.status == 202
    )
    assert reports >= 20 and commands[RESET_ORDER] >= 1 and commands[RETIRE] >= 1
    assert commands[ACK] >= 1
    records = consume_all(
        servers.ingest_settings,
        servers.ingest_settings.topic_reports,
        reports + sum(commands.values()),
    )
    kinds = Counter(control_kind(m.headers()) for m in records)
    assert kinds == {None: reports, **commands}


def test_the_admin_route_keeps_its_openapi_promise(runs: dict[str, Run]) -> None:
    result = runs["admin"]
    clean(result)
    seen = answered(result)
    assert seen["/v1/robots/{id}/reset-order", 202] + seen["/v1/robots/amr-7/reset-order", 202]
    assert seen["/v1/robots/{id}/reset-order", 422] >= 1, seen
    assert "/v1/robots/amr-7/reset-order" in {a.path for a in result.answers}
    assert seen["/v1/robots/{id}/retire", 202] + seen["/v1/robots/amr-7/retire", 202] >= 1, seen
    acks = [a for a in result.answers if a.path.startswith("/v1/incidents/")]
    assert {a.status for a in acks} >= {202, 422}, Counter(a.status for a in acks)
    # No rules file on this server: both rules routes answer the documented 404.
    assert {a.status for a in result.answers if a.path == "/v1/rules"} >= {404}
    assert max(a.status for a in result.answers) < 500


def test_the_query_server_keeps_its_openapi_promise(runs: dict[str, Run]) -> None:
    result = runs["query"]
    clean(result)
    seen = answered(result)
    for path in ("/v1/robots/amr-7", "/v1/robots/amr-7/history", "/v1/robots/amr-7/stats"):
        assert seen[path, 200] >= 1, seen  # the documented robot, seeded
    for path in ("/v1/robots", "/v1/alerts", "/v1/fleet/summary", "/v1/stream"):
        assert seen[path, 200] >= 1, seen
    for path in ("/v1/robots", "/v1/alerts", "/v1/stream"):
        assert seen[path, 422] >= 1, seen
    unknown = [p for p, status in seen if status == 404 and p.startswith("/v1/robots/{id}")]
    assert unknown, seen  # a robot id nobody reports as
    assert seen["/v1/robots", 401] >= 1, seen  # schemathesis' ignored_auth probes
    assert max(a.status for a in result.answers) < 500


# Findings of the runs above, kept as the exact requests that showed them.


def _report(**over: Any) -> dict[str, Any]:
    return {
        "robot_id": "amr-fz",
        "seq": 1,
        "ts": datetime.now(UTC).isoformat(),
        "status": "idle",
        "battery": 50.0,
        "pose": {"x": 0.0, "y": 0.0, "theta": 0.0},
        **over,
    }


def test_an_integer_written_with_a_zero_fraction_is_accepted(servers: Servers) -> None:
    # JSON Schema's `integer` admits 2298147.0; the decoder refused it (422 at `seq`).
    auth = {"Authorization": f"Bearer {INGEST}"}
    r = httpx.post(
        f"{servers.ingest}/v1/reports", json=_report(seq=2298147.0, boot=36101.0), headers=auth
    )
    assert (r.status_code, r.json()) == (202, {"accepted": 1})
    r = httpx.post(
        f"{servers.ingest}/v1/reports/batch", json=[_report(boot=1e0), _report()], headers=auth
    )
    assert (r.status_code, r.json()) == (202, {"accepted": 2})
    # A fraction is still refused, naming the field.
    r = httpx.post(f"{servers.ingest}/v1/reports", json=_report(seq=1.5), headers=auth)
    assert r.status_code == 422
    assert r.json()["fields"] == ["seq"]


def test_a_malformed_stream_id_is_refused_even_where_the_header_wins(servers: Servers) -> None:
    # `?last_event_id=` (empty, not an id) beside a good header was answered 200.
    headers = {"Authorization": f"Bearer {READ}", "Last-Event-ID": "0"}
    r = httpx.get(f"{servers.query}/v1/stream?last_event_id=", headers=headers, timeout=5)
    assert r.status_code == 422
    assert r.json()["fields"] == ["last_event_id"]


def test_the_stream_ids_are_documented_as_strings_not_null(servers: Servers) -> None:
    # The document said "string or null", so `Last-Event-ID: null` was schema-valid and
    # refused; a header or query value cannot be null: the document now says string.
    doc = httpx.get(f"{servers.query}/schema/openapi.json").json()
    for p in doc["paths"]["/v1/stream"]["get"]["parameters"]:
        assert p["schema"]["type"] == "string" and "oneOf" not in p["schema"], p
        assert p["required"] is False
    headers = {"Authorization": f"Bearer {READ}", "Last-Event-ID": "null"}
    r = httpx.get(f"{servers.query}/v1/stream", headers=headers, timeout=5)
    assert r.status_code == 422
    assert r.json()["fields"] == ["Last-Event-ID"]


def test_the_length_of_each_error_text_is_in_the_document(servers: Servers) -> None:
    # The document said only "items: string", so a 210-character error text was
    # schema-valid, and refused (422 at `[1].errors[8]`): each is at most 64 characters.
    doc = httpx.get(f"{servers.ingest}/schema/openapi.json").json()
    errors = doc["components"]["schemas"]["RobotReport"]["properties"]["errors"]
    assert errors["items"] == {"type": "string", "maxLength": 64}
    assert errors["maxItems"] == 16
    auth = {"Authorization": f"Bearer {INGEST}"}
    r = httpx.post(f"{servers.ingest}/v1/reports", json=_report(errors=["é" * 64]), headers=auth)
    assert (r.status_code, r.json()) == (202, {"accepted": 1})
    r = httpx.post(f"{servers.ingest}/v1/reports", json=_report(errors=["é" * 65]), headers=auth)
    assert r.status_code == 422
    assert r.json()["fields"] == ["errors[0]"]
