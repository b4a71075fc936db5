"""The query routes' hand-made JSON equals what encoding the decoded structs gives, and
the reader proxy's spans cost nothing on unsampled requests."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from api.query import RobotPage, page_json
from fleetpulse.schema import LiveState, Pose, RobotReport, encode
from observability.tracing import TracedCalls

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _state(i: int, **report: object) -> LiveState:
    r = RobotReport(
        robot_id=f"amr-{i}",
        seq=i,
        ts=T0,
        status="idle",
        battery=50.5 + i,
        pose=Pose(x=1.25 * i, y=-2.0, theta=0.1),
        **report,  # type: ignore[arg-type]
    )
    return LiveState(report=r, last_seen=1.7e9 + i / 3, online=bool(i % 2), status_since=T0)


@pytest.mark.parametrize("cursor", [None, "amr-9", "x:y_z.1-2"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_a_page_of_stored_states_is_the_json_of_the_decoded_page(
    n: int, cursor: str | None
) -> None:
    states = [_state(i, errors=['e\u00e9"\n'] if i == 1 else [], site="s") for i in range(n)]
    stored = [encode(s) for s in states]  # what the writer keeps in the robot hash
    want = msgspec.json.encode(RobotPage(items=states, next_cursor=cursor))
    assert page_json(stored, cursor) == want
    assert msgspec.json.decode(page_json(stored, cursor), type=RobotPage).items == states


class _Reader:
    def get_raw(self, robot_id: str) -> str:
        return robot_id

    async def summary(self) -> int:
        return 7


def _tracer(sampled: bool) -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON if sampled else ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


@pytest.mark.parametrize("sampled", [True, False])
def test_traced_calls_make_a_client_span_only_under_a_recorded_one(sampled: bool) -> None:
    tracer, exporter = _tracer(sampled)
    traced = TracedCalls(_Reader(), tracer, names={"get_raw": "get"})
    with tracer.start_as_current_span("GET /v1/robots/{robot_id:str}"):
        assert traced.get_raw("amr-1") == "amr-1"  # type: ignore[attr-defined]
        assert asyncio.run(traced.summary()) == 7  # type: ignore[attr-defined]
    assert traced.get_raw is traced.get_raw  # type: ignore[attr-defined]  # wrapped once
    spans = {s.name: s for s in exporter.get_finished_spans()}
    if not sampled:
        assert spans == {}
        return
    assert set(spans) == {"GET /v1/robots/{robot_id:str}", "redis get", "redis summary"}
    server = spans["GET /v1/robots/{robot_id:str}"]
    for name, op in (("redis get", "get"), ("redis summary", "summary")):
        span = spans[name]
        assert span.kind is trace.SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert dict(span.attributes or {}) == {"db.system": "redis", "db.operation": op}


def test_traced_calls_without_a_parent_leave_it_to_the_sampler() -> None:
    tracer, exporter = _tracer(sampled=True)
    TracedCalls(_Reader(), tracer).get_raw("amr-1")  # type: ignore[attr-defined]
    assert [s.name for s in exporter.get_finished_spans()] == ["redis get_raw"]
