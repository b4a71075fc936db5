"""ASGI middleware: a server span and request metrics for every routed request.

It runs after routing, so spans and metrics are named by the route template
(``GET /v1/robots/{robot_id:str}``), never by raw paths with unbounded values.
Handlers' own spans (e.g. the Kafka produce span) are children of the server span.

It is on every request's path, so what can be made once is made once: per route and
method, the span name, its attributes and the tracer are kept in a small table (route
templates are a fixed set), and metric label children are cached by
:class:`~observability.metrics.ApiMetrics`. Attributes known only at the end (the status)
are set only on spans that are recorded; an unsampled request costs one non-recording
span and no attribute work.

A caller's ``traceparent`` is continued only when ``trust`` says so (its token's scope is
in FLEETPULSE_TRACE_TRUST): otherwise anyone could force every request to be sampled,
and load Jaeger, by sending the sampled flag, even with a token that is refused. An
untrusted context becomes a link of a new root span, which our own ratio sampler keeps
or drops, so a trace that is kept still points at the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from observability.metrics import ApiMetrics
from observability.tracing import context_from_traceparent

__all__ = ["ObservabilityMiddleware"]

_ERROR = Status(StatusCode.ERROR)
_UNTRUSTED = {"fleetpulse.trace.untrusted": True}  # on the link to a caller's context


class _Route:
    """What the middleware needs for one (route template, method), made on first use."""

    __slots__ = ("attributes", "name", "tracer")

    def __init__(self, name: str, tracer: trace.Tracer, attributes: Mapping[str, str]) -> None:
        self.name = name
        self.tracer = tracer
        self.attributes = attributes  # the SDK copies them into each recorded span


class ObservabilityMiddleware(ASGIMiddleware):
    """Server span + request count + latency histogram per route template."""

    scopes = ("http",)  # type: ignore[assignment]

    def __init__(
        self,
        tracer: trace.Tracer,
        metrics: ApiMetrics,
        ingest_tracer: trace.Tracer | None = None,
        ingest_routes: Collection[str] = (),
        trust: Callable[[str | None], bool] | None = None,
    ) -> None:
        """``trust(authorization)``: whether the request's trace context is continued
        (None: always)."""
        self.trust = trust
        self.tracer = tracer
        self.ingest_tracer = ingest_tracer or tracer  # spans of the webhook side's routes
        self.ingest_routes = frozenset(ingest_routes)  # their templates
        self.metrics = metrics
        self._routes: dict[tuple[str, str], _Route] = {}

    def _route(self, route: str, method: str) -> _Route:
        found = self._routes.get((route, method))
        if found is None:
            tracer = self.ingest_tracer if route in self.ingest_routes else self.tracer
            attributes = {"http.request.method": method, "http.route": route}
            found = self._routes[(route, method)] = _Route(f"{method} {route}", tracer, attributes)
        return found

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        method = str(scope.get("method") or "GET")
        route = scope.get("path_template") or "unmatched"
        started = time.perf_counter()
        status = 500
        parent = None
        authorization = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                parent = context_from_traceparent(value.decode("latin-1"))
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        links: list[Link] | None = None
        if parent is not None and self.trust is not None and not self.trust(authorization):
            links = [Link(trace.get_current_span(parent).get_span_context(), _UNTRUSTED)]
            parent = None
        r = self._route(route, method)
        span = r.tracer.start_span(
            r.name, context=parent, kind=SpanKind.SERVER, attributes=r.attributes, links=links
        )
        # The handler's spans (and traceparent headers) find the server span here.
        token = otel_context.attach(trace.set_span_in_context(span, parent))

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
            otel_context.detach(token)
            if span.is_recording():
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(_ERROR)
            span.end()
            self.metrics.observe_request(route, method, status, time.perf_counter() - started)
