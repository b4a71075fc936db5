"""One trace per report from HTTP to Redis in Jaeger; metrics that equal the workload."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import TestClient
from opentelemetry import trace
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.auth import hash_token, new_token
from deploy.local.harness import FlowProcess, isolated, produce, report, wait_until
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader

TOKEN = new_token()


def _client(s: Settings) -> TestClient[Any]:
    client = TestClient(create_app(s, query=False), raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    return client


def _with_token(s: Settings, **over: Any) -> Settings:
    return msgspec.structs.replace(s, api_tokens=f"ingest:{hash_token(TOKEN)}", **over)


def _jaeger_trace(s: Settings, robot: str, want_spans: int) -> dict[str, Any]:
    """The trace whose produce span carries ``robot``, once it holds ``want_spans`` spans."""
    api = s.jaeger_api
    tags = json.dumps({"robot_id": robot})
    trace_id = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not trace_id:
            r = httpx.get(
                f"{api}/api/traces",
                params={"service": "fleetpulse-ingest", "tags": tags, "lookback": "1h"},
                timeout=5,
            )
            data = r.json().get("data") or []
            trace_id = data[0]["traceID"] if data else ""
        if trace_id:
            found = httpx.get(f"{api}/api/traces/{trace_id}", timeout=5).json().get("data") or []
            if found and len(found[0]["spans"]) >= want_spans:
                return found[0]  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"no complete trace for {robot} in Jaeger after 60 s (trace {trace_id!r})")


@pytest.mark.parametrize("sampled_by", ["ratio", "traceparent"])
def test_one_trace_holds_http_produce_process_and_redis_write(
    stack: Stack, settings: Settings, tmp_path: Path, sampled_by: str
) -> None:
    # Kept by the ratio (1.0), or at ratio 0 by a caller's sampled traceparent: a user
    # can follow one report whatever FLEETPULSE_TRACE_SAMPLE_RATIO says.
    ratio = 1.0 if sampled_by == "ratio" else 0.0
    s = _with_token(
        isolated(settings, tmp_path),
        trace_sample_ratio=ratio,
        dataflow_metrics_port=0,
        trace_trust="ingest",  # this caller's context is continued (FLEETPULSE_TRACE_TRUST)
    )
    robot = f"amr-trace-{uuid.uuid4().hex[:8]}"
    caller = (uuid.uuid4().hex, uuid.uuid4().hex[:16])
    headers = {"traceparent": f"00-{caller[0]}-{caller[1]}-01"} if ratio == 0.0 else {}
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        with _client(s) as client:
            posted = client.post("/v1/reports", json=report(robot, 1), headers=headers)
            assert posted.status_code == 202
        provider = trace.get_tracer_provider()
        assert hasattr(provider, "force_flush")
        provider.force_flush()
        reader = RedisStateReader(connect(s), s)
        wait_until("the report in Redis", lambda: reader.get(robot), 60, [flow])
        found = _jaeger_trace(s, robot, want_spans=4)
    finally:
        flow.stop()

    services = {pid: p["serviceName"] for pid, p in found["processes"].items()}
    spans = {sp["operationName"]: sp for sp in found["spans"]}
    server = spans["POST /v1/reports"]
    produce_span = spans[f"produce {s.topic_reports}"]
    process = spans["process report"]
    write = spans["redis write"]

    def parent(span: dict[str, Any]) -> str | None:
        refs = [r for r in span["references"] if r["refType"] == "CHILD_OF"]
        return refs[0]["spanID"] if refs else None

    assert parent(server) == (caller[1] if headers else None)
    assert found["traceID"] == (caller[0] if headers else found["traceID"])
    assert parent(produce_span) == server["spanID"]
    assert parent(process) == produce_span["spanID"]
    assert parent(write) == process["spanID"]
    assert services[server["processID"]] == "fleetpulse-ingest"
    assert services[produce_span["processID"]] == "fleetpulse-ingest"
    assert services[process["processID"]] == "fleetpulse-dataflow"
    assert services[write["processID"]] == "fleetpulse-dataflow"
    tags = {t["key"]: t["value"] for t in process["tags"]}
    assert tags["robot_id"] == robot and tags["seq"] == 1


def _traces_of(s: Settings, robot: str) -> list[dict[str, Any]]:
    found = httpx.get(
        f"{s.jaeger_api}/api/traces",
        params={"service": "fleetpulse-ingest", "tags": json.dumps({"robot_id": robot}),
                "lookback": "1h"},
        timeout=5,
    ).json()  # fmt: skip
    return list(found.get("data") or [])


def test_an_untrusted_caller_cannot_force_sampling_or_join_its_trace(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Ingest tokens are not trusted by default (FLEETPULSE_TRACE_TRUST=admin): robots are
    # outside. At ratio 0 a sampled traceparent from one of them, or from a caller whose
    # token is refused, makes no trace; at ratio 1 the kept trace is our own, linked to it.
    caller = (uuid.uuid4().hex, uuid.uuid4().hex[:16])
    sampled = {"traceparent": f"00-{caller[0]}-{caller[1]}-01"}
    robots = {name: f"amr-untrusted-{name}-{uuid.uuid4().hex[:6]}" for name in ("r0", "r1")}
    base = isolated(settings, tmp_path)
    assert base.trace_trust == "admin"
    for ratio, robot in ((0.0, robots["r0"]), (1.0, robots["r1"])):
        s = _with_token(base, trace_sample_ratio=ratio)
        with _client(s) as client:
            ok = client.post("/v1/reports", json=report(robot, 1), headers=sampled)
            refused = client.post(
                "/v1/reports", json=report(robot, 2),
                headers={**sampled, "Authorization": "Bearer fp_not-a-token"},
            )  # fmt: skip
        assert (ok.status_code, refused.status_code) == (202, 401)
    provider = trace.get_tracer_provider()
    assert hasattr(provider, "force_flush")
    provider.force_flush()
    kept = wait_until("the ratio-1 report's own trace", lambda: _traces_of(base, robots["r1"]), 30)
    (own,) = kept
    assert own["traceID"] != caller[0]
    server = next(sp for sp in own["spans"] if sp["operationName"] == "POST /v1/reports")
    links = [r for r in server["references"] if r["traceID"] == caller[0]]
    assert [(r["spanID"], r["refType"]) for r in links] == [(caller[1], "FOLLOWS_FROM")]
    time.sleep(1.0)  # past the exporters' batch delay: a span of r0 would be in Jaeger by now
    assert _traces_of(base, robots["r0"]) == []
    caller_trace = httpx.get(f"{base.jaeger_api}/api/traces/{caller[0]}", timeout=5)
    assert caller_trace.status_code == 404 or not caller_trace.json().get("data")


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _sum(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def test_metrics_equal_a_known_workload(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    s = _with_token(
        isolated(settings, tmp_path), trace_sample_ratio=0.0, dataflow_metrics_port=port
    )
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        with _client(s) as client:
            # 100 accepted: a batch of 90 new reports, 5 singles, 5 duplicates of the singles.
            batch = [report(f"amr-m{i % 10}", i // 10) for i in range(90)]
            assert client.post("/v1/reports/batch", json=batch).status_code == 202
            for i in range(5):
                assert client.post("/v1/reports", json=report("amr-m0", 100 + i)).status_code == 202
            for i in range(5):
                assert client.post("/v1/reports", json=report("amr-m0", 100 + i)).status_code == 202
            # 7 rejected: 4 schema errors, 1 bad JSON, 1 wrong content type, 1 missing token.
            for bad in (report("x y", 1), report("amr-1", -1), report("amr-1", 1, battery=101), []):
                assert client.post("/v1/reports", json=bad).status_code == 422
            assert (
                client.post(
                    "/v1/reports", content=b"{", headers={"Content-Type": "application/json"}
                ).status_code
                == 422
            )
            assert (
                client.post(
                    "/v1/reports", content=b"x", headers={"Content-Type": "text/plain"}
                ).status_code
                == 415
            )
            assert (
                client.post(
                    "/v1/reports", json=report("amr-1", 1), headers={"Authorization": ""}
                ).status_code
                == 401
            )
            api = _metrics(client.get("/metrics").text)
        # 3 poison messages straight into Kafka: they must land in the DLQ.
        produce(s, [(b"amr-m1", b"not json"), (None, b"{}"), (b"amr-m2", b'{"robot_id":"amr-m2"}')])

        url = f"http://127.0.0.1:{port}/metrics"

        def flow_metrics() -> dict[Any, float] | None:
            try:
                m = _metrics(httpx.get(url, timeout=2).text)
            except httpx.HTTPError:
                return None
            done = _sum(m, "fleetpulse_flow_reports_applied_total") == 95
            # Once everything is read, every partition with stats reports no lag.
            lags = [v for (name, _), v in m.items() if name == "fleetpulse_flow_consumer_lag"]
            lag_seen = bool(lags) and sum(lags) == 0
            dead = _sum(m, "fleetpulse_flow_dead_letters_total") == 3
            return m if done and dead and lag_seen else None

        flow_m = wait_until("the dataflow's counters", flow_metrics, 60, [flow])
    finally:
        flow.stop()

    assert api[("fleetpulse_ingest_reports_accepted_total", ())] == 100
    assert _sum(api, "fleetpulse_api_rejected_total") == 7
    assert api[("fleetpulse_api_rejected_total", (("reason", "invalid_report"),))] == 4
    assert api[("fleetpulse_api_rejected_total", (("reason", "invalid_json"),))] == 1
    assert api[("fleetpulse_api_rejected_total", (("reason", "unsupported_media_type"),))] == 1
    assert api[("fleetpulse_api_rejected_total", (("reason", "unauthorized"),))] == 1
    route = (("method", "POST"), ("route", "/v1/reports"), ("status", "202"))
    assert api[("fleetpulse_api_requests_total", route)] == 10
    assert (
        api[
            (
                "fleetpulse_api_request_seconds_count",
                (("method", "POST"), ("route", "/v1/reports/batch")),
            )
        ]
        == 1
    )

    assert _sum(flow_m, "fleetpulse_flow_reports_applied_total") == 95
    # The re-sent singles 100..104 arrive after 104 was applied: 104 is a duplicate,
    # 100..103 are older than the newest, i.e. stale.
    assert _sum(flow_m, "fleetpulse_flow_reports_duplicate_total") == 1
    assert _sum(flow_m, "fleetpulse_flow_reports_stale_total") == 4
    assert flow_m[("fleetpulse_flow_dead_letters_total", (("kind", "invalid"),))] == 2
    assert flow_m[("fleetpulse_flow_dead_letters_total", (("kind", "key"),))] == 1
    # Freshness is observed per robot state made visible: at least once per robot, at
    # most once per applied report.
    assert 10 <= flow_m[("fleetpulse_flow_freshness_seconds_count", ())] <= 95
    lag = {
        dict(labels)["partition"]: v
        for (name, labels), v in flow_m.items()
        if name == "fleetpulse_flow_consumer_lag"
    }
    assert lag and set(lag) <= {str(p) for p in range(12)}
    assert all(v >= 0 for v in lag.values())


def test_query_routes_have_server_spans_with_redis_client_spans(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    read = new_token()
    s = msgspec.structs.replace(
        settings,
        api_tokens=f"read:{hash_token(read)}",
        redis_prefix=f"t{uuid.uuid4().hex[:8]}",
        trace_sample_ratio=1.0,
    )
    robot = f"amr-q{uuid.uuid4().hex[:6]}"
    started_us = int(time.time() * 1e6)
    with TestClient(create_app(s, ingest=False), raise_server_exceptions=False) as client:
        r = client.get(f"/v1/robots/{robot}", headers={"Authorization": f"Bearer {read}"})
        assert r.status_code == 404
    provider = trace.get_tracer_provider()
    assert hasattr(provider, "force_flush")
    provider.force_flush()

    def found() -> dict[str, Any] | None:
        r = httpx.get(
            f"{s.jaeger_api}/api/traces",
            params={"service": "fleetpulse-api", "start": started_us, "limit": 50},
            timeout=5,
        )
        for t in r.json().get("data") or []:
            names = {sp["operationName"] for sp in t["spans"]}
            if "redis get" in names and any(n.startswith("GET /v1/robots/") for n in names):
                return t  # type: ignore[no-any-return]
        return None

    t = wait_until("the query trace in Jaeger", found, 30)
    spans = {sp["operationName"]: sp for sp in t["spans"]}
    server = next(sp for name, sp in spans.items() if name.startswith("GET /v1/robots/"))
    redis_span = spans["redis get"]
    refs = [r["spanID"] for r in redis_span["references"] if r["refType"] == "CHILD_OF"]
    assert refs == [server["spanID"]]
    tags = {tg["key"]: tg["value"] for tg in server["tags"]}
    assert tags["http.response.status_code"] == 404
