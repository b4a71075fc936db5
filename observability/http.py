"""ASGI middleware: a server span and request metrics for every routed request.

It runs after routing, so spans and metrics are named by the route template
(``GET /v1/robots/{robot_id:str}``), never by raw paths with unbounded values.
Handlers' own spans (e.g. the Kafka produce span) are children of the server span.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from observability.metrics import ApiMetrics
from observability.tracing import context_from_traceparent

__all__ = ["ObservabilityMiddleware"]


class ObservabilityMiddleware(ASGIMiddleware):
    """Server span + request count + latency histogram per route template."""

    scopes = ("http",)  # type: ignore[assignment]

    def __init__(
        self,
        tracer: trace.Tracer,
        metrics: ApiMetrics,
        ingest_tracer: trace.Tracer | None = None,
        ingest_routes: Collection[str] = (),
    ) -> None:
        self.tracer = tracer
        self.ingest_tracer = ingest_tracer or tracer  # spans of the webhook side's routes
        self.ingest_routes = frozenset(ingest_routes)  # their templates
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        method = str(scope.get("method", "GET"))
        route = str(scope.get("path_template") or "unmatched")
        status = 500
        started = time.perf_counter()
        parent = None
        for name, value in scope.get("headers", ()):
            if name == b"traceparent":
                parent = context_from_traceparent(value.decode("latin-1"))
        tracer = self.ingest_tracer if route in self.ingest_routes else self.tracer
        with tracer.start_as_current_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await next_app(scope, receive, send_wrapper)
            except Exception as exc:
                code = getattr(exc, "status_code", None) or getattr(exc, "status", None)
                status = code if isinstance(code, int) else 500
                raise
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                elapsed = time.perf_counter() - started
                self.metrics.requests.labels(route, method, str(status)).inc()
                self.metrics.latency.labels(route, method).observe(elapsed)
