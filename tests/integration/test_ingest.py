"""Ingest against real Kafka: durable 202s, exact rejections, 503 while the broker is away."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.auth import hash_token, new_token
from fleetpulse.reload import config_hash
from fleetpulse.schema import decode_report, encode
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all

INGEST = new_token()
READ = new_token()


def recent_ts(ago_s: float = 60.0) -> str:
    """A ts ``ago_s`` behind the server's clock, at +01:00 and with milliseconds (the
    server refuses a ts outside FLEETPULSE_MAX_AGE_S / FLEETPULSE_MAX_FUTURE_S of it)."""
    at = datetime.fromtimestamp(time.time() - ago_s, timezone(timedelta(hours=1)))
    return at.isoformat(timespec="milliseconds")


def report(robot_id: str = "amr-7", seq: int = 1, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "robot_id": robot_id,
        "boot": 0,
        "seq": seq,
        "ts": recent_ts(),
        "status": "moving",
        "battery": 87.5,
        "pose": {"x": 1.5, "y": -2.0, "theta": 0.25},
        "speed": 0.8,
        "errors": [],
        "site": "plant-1",
    }
    body.update(over)
    return body


def ingest_settings(settings: Settings, topic: str, **over: Any) -> Settings:
    tokens = f"ingest:{hash_token(INGEST)},read:{hash_token(READ)}"
    return msgspec.structs.replace(settings, topic_reports=topic, api_tokens=tokens, **over)


@contextmanager
def ingest_client(
    settings: Settings, topic: str, tokens: str, **over: Any
) -> Iterator[TestClient[Any]]:
    """The ingest app on real Kafka, posting to ``topic``, with ``tokens`` (and more settings)."""
    s = msgspec.structs.replace(settings, topic_reports=topic, api_tokens=tokens, **over)
    with TestClient(create_app(s, query=False), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    return make_topic(3)


@pytest.fixture
def client(settings: Settings, topic: str) -> Iterator[TestClient[Any]]:
    app = create_app(ingest_settings(settings, topic), query=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {INGEST}"
        yield c


def test_posted_report_is_on_the_topic_with_key_value_and_headers(
    client: TestClient[Any], settings: Settings, topic: str
) -> None:
    before_ms = int(time.time() * 1000)
    body = report(ts="2026-11-26T10:00:00.250+01:00")
    r = client.post("/v1/reports", json=body)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1}

    (msg,) = consume_all(settings, topic, expect=1)
    assert msg.key() == b"amr-7"
    assert msg.value() == encode(decode_report(json.dumps(body)))
    assert decode_report(msg.value()).ts.isoformat() == "2026-11-26T10:00:00.250000+01:00"
    headers = dict(msg.headers())
    # version 00, trace id, span id, flags: sampled (01), with the random-trace-id bit (03)
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]", headers["traceparent"])
    assert before_ms <= int(headers["ingest_ms"]) <= int(time.time() * 1000)


def test_batch_of_1000_arrives_complete(
    client: TestClient[Any], settings: Settings, topic: str
) -> None:
    batch = [report(f"amr-{i % 50}", seq=i) for i in range(1000)]
    r = client.post("/v1/reports/batch", json=batch)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1000}
    msgs = consume_all(settings, topic, expect=1000)
    assert len(msgs) == 1000
    got = sorted((m.key().decode(), decode_report(m.value()).seq) for m in msgs)
    assert got == sorted((f"amr-{i % 50}", i) for i in range(1000))
    # Key = robot_id, so one robot's reports share a partition and keep their order.
    by_robot: dict[bytes, set[int]] = {}
    for m in msgs:
        by_robot.setdefault(m.key(), set()).add(m.partition())
    assert all(len(parts) == 1 for parts in by_robot.values())


def _raw(text: str) -> bytes:
    return text.encode()


GOOD = json.dumps(report())
BAD_CASES: list[tuple[str, str, Any, dict[str, str], int, str, list[str], str]] = [
    # (id, route, body, extra headers, status, error, fields, detail substring)
    ("malformed-json", "/v1/reports", _raw('{"robot_id": '), {}, 422, "invalid_json", [], "not valid JSON"),
    ("seq-as-string", "/v1/reports", report(seq="3"), {}, 422, "invalid_report", ["seq"], "Expected `int`"),
    ("nan", "/v1/reports", _raw(GOOD.replace("87.5", "NaN")), {}, 422, "invalid_json", [], "malformed"),
    ("infinity", "/v1/reports", _raw(GOOD.replace("87.5", "Infinity")), {}, 422, "invalid_json", [], "malformed"),
    ("huge-number-is-inf", "/v1/reports", _raw(GOOD.replace('"x": 1.5', '"x": 1e999')), {}, 422, "invalid_report", ["pose.x"], "out of range"),
    ("battery-101", "/v1/reports", report(battery=101), {}, 422, "invalid_report", ["battery"], "<= 100.0"),
    ("battery-negative", "/v1/reports", report(battery=-0.1), {}, 422, "invalid_report", ["battery"], ">= 0.0"),
    ("negative-seq", "/v1/reports", report(seq=-1), {}, 422, "invalid_report", ["seq"], ">= 0"),
    ("negative-boot", "/v1/reports", report(boot=-1), {}, 422, "invalid_report", ["boot"], ">= 0"),
    ("robot-id-brace", "/v1/reports", report("amr{7}"), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("robot-id-star", "/v1/reports", report("amr*"), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("robot-id-space", "/v1/reports", report("amr 7"), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("robot-id-non-ascii", "/v1/reports", report("amr-ü"), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("robot-id-65-chars", "/v1/reports", report("a" * 65), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("robot-id-empty", "/v1/reports", report(""), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("unknown-field", "/v1/reports", report(color="red"), {}, 422, "invalid_report", ["color"], "unknown field"),
    ("missing-seq", "/v1/reports", {k: v for k, v in report().items() if k != "seq"}, {}, 422, "invalid_report", ["seq"], "missing required field"),
    ("ts-without-offset", "/v1/reports", report(ts="2026-11-26T10:00:00"), {}, 422, "invalid_report", ["ts"], "timezone"),
    ("ts-not-a-time", "/v1/reports", report(ts="yesterday"), {}, 422, "invalid_report", ["ts"], "Invalid RFC3339"),
    ("status-unknown", "/v1/reports", report(status="flying"), {}, 422, "invalid_report", ["status"], "Invalid enum value 'flying'"),
    ("17-errors", "/v1/reports", report(errors=["e"] * 17), {}, 422, "invalid_report", ["errors"], "length <= 16"),
    ("error-65-chars", "/v1/reports", report(errors=["e" * 65]), {}, 422, "invalid_report", ["errors[0]"], "length <= 64"),
    ("pose-missing-theta", "/v1/reports", report(pose={"x": 1, "y": 2}), {}, 422, "invalid_report", ["pose.theta"], "missing required field"),
    ("speed-negative", "/v1/reports", report(speed=-1), {}, 422, "invalid_report", ["speed"], ">= 0.0"),
    ("site-with-space", "/v1/reports", report(site="plant 1"), {}, 422, "invalid_report", ["site"], "matching regex"),
    # Regressions: a trailing newline passed the id pattern (its `$` matched before it).
    ("robot-id-trailing-newline", "/v1/reports", report("amr-1\n"), {}, 422, "invalid_report", ["robot_id"], "matching regex"),
    ("site-trailing-newline", "/v1/reports", report(site="plant-1\n"), {}, 422, "invalid_report", ["site"], "matching regex"),
    ("batch-robot-id-trailing-newline", "/v1/reports/batch", [report(), report("amr-1\n")], {}, 422, "invalid_report", ["[1].robot_id"], "item 1 of the batch"),
    # Regressions: any ts was accepted, from year 1 to year 9999.
    ("ts-year-9999", "/v1/reports", report(ts="9999-12-31T23:59:30Z"), {}, 422, "invalid_report", ["ts"], "ahead of the receiving clock; accepted: "),
    ("ts-year-1", "/v1/reports", report(ts="0001-01-01T00:00:30+01:00"), {}, 422, "invalid_report", ["ts"], "behind the receiving clock; accepted: "),
    ("batch-ts-year-9999", "/v1/reports/batch", [report(seq=1), report(seq=2), report(seq=3, ts="9999-12-31T23:59:30Z")], {}, 422, "invalid_report", ["[2].ts"], "item 2 of the batch: ts 9999-12-31T23:59:30+00:00 is"),
    ("batch-ts-year-1", "/v1/reports/batch", [report(seq=1, ts="0001-01-01T00:00:30+01:00"), report(seq=2)], {}, 422, "invalid_report", ["[0].ts"], "FLEETPULSE_MAX_AGE_S="),
    ("array-to-single-route", "/v1/reports", [report()], {}, 422, "invalid_report", [], "Expected `object`, got `array`"),
    ("body-over-limit", "/v1/reports/batch", _raw("[" + ",".join([GOOD] * 5000) + "]"), {}, 413, "body_too_large", [], "FLEETPULSE_MAX_BODY_BYTES"),
    ("empty-batch", "/v1/reports/batch", [], {}, 422, "empty_batch", [], "no reports"),
    ("batch-one-bad-item", "/v1/reports/batch", [report(seq=1), report(seq=2), report(seq=3, battery=101)], {}, 422, "invalid_report", ["[2].battery"], "item 2 of the batch"),
    ("batch-1001", "/v1/reports/batch", [report(seq=i) for i in range(1001)], {}, 413, "batch_too_large", [], "at most 1000"),
    ("batch-not-array", "/v1/reports/batch", report(), {}, 422, "invalid_report", [], "Expected `array`, got `object`"),
    ("wrong-content-type", "/v1/reports", _raw(GOOD), {"Content-Type": "text/plain"}, 415, "unsupported_media_type", [], "text/plain"),
    ("missing-content-type", "/v1/reports", _raw(GOOD), {"Content-Type": ""}, 415, "unsupported_media_type", [], "missing"),
    ("missing-token", "/v1/reports", report(), {"Authorization": ""}, 401, "unauthorized", [], "missing bearer token"),
    ("invalid-token", "/v1/reports", report(), {"Authorization": "Bearer fp_not-a-real-token"}, 401, "unauthorized", [], "unknown bearer token"),
    ("basic-auth", "/v1/reports", report(), {"Authorization": "Basic YTpi"}, 401, "unauthorized", [], "Bearer <token>"),
    ("wrong-scope", "/v1/reports", report(), {"Authorization": f"Bearer {READ}"}, 403, "forbidden", [], "needs ingest"),
    ("wrong-scope-batch", "/v1/reports/batch", [report()], {"Authorization": f"Bearer {READ}"}, 403, "forbidden", [], "needs ingest"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "body", "headers", "status", "error", "fields", "detail"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CASES],
)
def test_bad_input_is_rejected_with_a_clear_error(
    client: TestClient[Any],
    route: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    error: str,
    fields: list[str],
    detail: str,
) -> None:
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json", **headers}
        r = client.post(route, content=body, headers=headers)
    else:
        r = client.post(route, json=body, headers=headers)
    assert r.status_code == status, r.text
    answer = r.json()
    assert set(answer) == {"error", "detail", "fields"}
    assert answer["error"] == error
    assert answer["fields"] == fields
    assert detail in answer["detail"]
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_rejected_input_never_reaches_the_topic(
    client: TestClient[Any], settings: Settings, topic: str
) -> None:
    assert len(BAD_CASES) >= 25
    for _id, route, body, headers, status, *_rest in BAD_CASES:
        if isinstance(body, bytes):
            r = client.post(
                route, content=body, headers={"Content-Type": "application/json", **headers}
            )
        else:
            r = client.post(route, json=body, headers=headers)
        assert r.status_code == status
    sentinel = report("sentinel", seq=99)
    assert client.post("/v1/reports", json=sentinel).status_code == 202
    msgs = consume_all(settings, topic, expect=1)
    assert [m.key() for m in msgs] == [b"sentinel"]


def test_health_and_readiness(client: TestClient[Any], settings: Settings) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready", "config": config_hash(settings)})


BOUNDS = {"max_future_s": 120.0, "max_age_s": 3600.0}


@pytest.fixture
def bounded(settings: Settings, topic: str) -> Iterator[TestClient[Any]]:
    """An ingest app that accepts a ts from 1 h behind to 2 min ahead of its clock."""
    app = create_app(ingest_settings(settings, topic, **BOUNDS), query=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {INGEST}"
        yield c


def _at(offset_s: float) -> str:
    return datetime.fromtimestamp(time.time() + offset_s, UTC).isoformat()


# offsets from the server's clock: 10 s inside and 10 s outside each bound
INSIDE = {"ahead": BOUNDS["max_future_s"] - 10, "behind": -BOUNDS["max_age_s"] + 10}
OUTSIDE = {"ahead": BOUNDS["max_future_s"] + 10, "behind": -BOUNDS["max_age_s"] - 10}


@pytest.mark.parametrize("side", ["ahead", "behind"])
def test_ts_outside_the_bounds_of_the_server_clock_is_refused_naming_the_range(
    bounded: TestClient[Any], settings: Settings, topic: str, side: str
) -> None:
    before = time.time()
    single = bounded.post("/v1/reports", json=report("amr-out", ts=_at(OUTSIDE[side])))
    batch = [report("amr-out", seq=1), report("amr-out", seq=2, ts=_at(OUTSIDE[side]))]
    many = bounded.post("/v1/reports/batch", json=batch)
    after = time.time()

    assert (single.status_code, many.status_code) == (422, 422), (single.text, many.text)
    assert single.json()["error"] == many.json()["error"] == "invalid_report"
    assert (single.json()["fields"], many.json()["fields"]) == (["ts"], ["[1].ts"])
    assert many.json()["detail"].startswith("item 1 of the batch: ts ")
    for answer in (single.json(), many.json()):
        detail = answer["detail"]
        word = "ahead of" if side == "ahead" else "behind"
        assert f" s {word} the receiving clock; " in detail
        assert "FLEETPULSE_MAX_FUTURE_S=120 s ahead, FLEETPULSE_MAX_AGE_S=3600 s behind" in detail
        found = re.search(r"accepted: (\S+) to (\S+) ", detail)
        assert found is not None, detail
        low, high = (datetime.fromisoformat(x).timestamp() for x in found.groups())
        assert before - 3600 - 1 <= low <= after - 3600
        assert before + 120 - 1 <= high <= after + 120

    # Neither the report nor any item of the batch reached Kafka.
    assert bounded.post("/v1/reports", json=report("sentinel")).status_code == 202
    assert [m.key() for m in consume_all(settings, topic, expect=1)] == [b"sentinel"]


def test_ts_just_inside_the_bounds_is_accepted(
    bounded: TestClient[Any], settings: Settings, topic: str
) -> None:
    ahead = report("amr-in", seq=1, ts=_at(INSIDE["ahead"]))
    behind = report("amr-in", seq=2, ts=_at(INSIDE["behind"]))
    assert bounded.post("/v1/reports", json=ahead).status_code == 202
    assert bounded.post("/v1/reports", json=behind).status_code == 202
    batch = [
        report("amr-in", seq=3, ts=_at(INSIDE["ahead"])),
        report("amr-in", seq=4, ts=_at(INSIDE["behind"])),
    ]
    r = bounded.post("/v1/reports/batch", json=batch)
    assert (r.status_code, r.json()) == (202, {"accepted": 2})
    msgs = consume_all(settings, topic, expect=4)
    assert sorted(decode_report(m.value()).seq for m in msgs) == [1, 2, 3, 4]


def test_openapi_of_the_ingest_routes_states_the_time_bounds(
    client: TestClient[Any], settings: Settings
) -> None:
    paths = client.get("/schema/openapi.json").json()["paths"]
    for path in ("/v1/reports", "/v1/reports/batch"):
        op = paths[path]["post"]
        assert f"FLEETPULSE_MAX_FUTURE_S ({settings.max_future_s:g} s)" in op["description"]
        assert f"FLEETPULSE_MAX_AGE_S ({settings.max_age_s:g} s)" in op["description"]
        assert set(op["responses"]) >= {"202", "401", "403", "413", "415", "422", "503"}
        assert op["security"] == [{"bearer": []}]


def test_single_post_body_limit_is_exact_with_and_without_content_length(
    settings: Settings, topic: str
) -> None:
    # The single post is answered before Litestar's routing (api.fast) when all is in
    # order; a body over the limit must still be Litestar's 413, whether the client said
    # its length or streamed it in chunks, and nothing of it may reach the topic.
    limit = 600
    app = create_app(ingest_settings(settings, topic, max_body_bytes=limit), query=False)
    body = json.dumps(report(seq=1)).encode()
    at_limit = body + b" " * (limit - len(body))
    over = at_limit + b" "
    headers = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"}

    def chunks(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 100):
            yield data[i : i + 100]

    with TestClient(app, raise_server_exceptions=False) as c:
        answers = [
            c.post("/v1/reports", content=at_limit, headers=headers),
            c.post("/v1/reports", content=over, headers=headers),
            c.post("/v1/reports", content=chunks(over), headers=headers),
            c.post("/v1/reports", content=chunks(at_limit), headers=headers),
        ]
    assert [(a.status_code, a.json().get("error")) for a in answers] == [
        (202, None),
        (413, "body_too_large"),
        (413, "body_too_large"),
        (202, None),
    ]
    msgs = consume_all(settings, topic, expect=2)
    assert [decode_report(m.value() or b"").seq for m in msgs] == [1, 1]
