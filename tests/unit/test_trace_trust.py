"""A caller's trace context is continued only when its token's scope is trusted
(FLEETPULSE_TRACE_TRUST); otherwise the server samples a root of its own, linked to it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from api.auth import TokenStore, hash_token
from fleetpulse.errors import ConfigError
from fleetpulse.settings import load_settings
from observability.http import ObservabilityMiddleware
from observability.metrics import ApiMetrics

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01".encode()
TOKENS = {"ingest": "fp_ingest-token", "read": "fp_read-token", "admin": "fp_admin-token"}
STORE = TokenStore.parse(",".join(f"{s}:{hash_token(t)}" for s, t in TOKENS.items()))


def serve(trust_setting: str, ratio: float, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    """One request through the middleware; the spans it recorded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    middleware = ObservabilityMiddleware(tracer, ApiMetrics(), trust=STORE.trusts(trust_setting))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: Any) -> None:
        return None

    scope = {"type": "http", "method": "POST", "path_template": "/v1/reports", "headers": headers}
    asyncio.run(middleware.handle(scope, receive, send, app))  # type: ignore[arg-type]
    return list(exporter.get_finished_spans())


def bearer(scope: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {TOKENS[scope]}".encode())


def test_a_trusted_scope_continues_the_callers_trace_even_at_ratio_zero() -> None:
    (span,) = serve("ingest,admin", 0.0, [(b"traceparent", SAMPLED), bearer("ingest")])
    assert format(span.context.trace_id, "032x") == CALLER_TRACE
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER_SPAN
    assert not span.links


@pytest.mark.parametrize(
    "headers",
    [
        [(b"traceparent", SAMPLED)],  # no token at all
        [(b"traceparent", SAMPLED), (b"authorization", b"Bearer fp_refused")],  # refused
        [(b"traceparent", SAMPLED), bearer("ingest")],  # valid, but not a trusted scope
        [(b"traceparent", SAMPLED), bearer("read")],
    ],
    ids=["no-token", "refused-token", "ingest-untrusted", "read-untrusted"],
)
def test_an_untrusted_caller_cannot_force_sampling(headers: list[tuple[bytes, bytes]]) -> None:
    assert serve("admin", 0.0, headers) == []  # the server's ratio (0) decides: no span


def test_an_untrusted_context_kept_by_our_ratio_is_a_linked_root() -> None:
    (span,) = serve("admin", 1.0, [(b"traceparent", SAMPLED), bearer("ingest")])
    assert span.parent is None
    assert format(span.context.trace_id, "032x") != CALLER_TRACE
    (link,) = span.links
    assert format(link.context.trace_id, "032x") == CALLER_TRACE
    assert link.attributes == {"fleetpulse.trace.untrusted": True}


def test_all_continues_everyone_and_empty_no_one() -> None:
    (span,) = serve("all", 0.0, [(b"traceparent", SAMPLED)])
    assert format(span.context.trace_id, "032x") == CALLER_TRACE
    assert serve("", 0.0, [(b"traceparent", SAMPLED), bearer("admin")]) == []


def test_the_setting_is_checked() -> None:
    assert load_settings({}).trace_trust == "admin"
    with pytest.raises(ConfigError) as info:
        load_settings({"FLEETPULSE_TRACE_TRUST": "robots"})
    assert "FLEETPULSE_TRACE_TRUST" in str(info.value)
