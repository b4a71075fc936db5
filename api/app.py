"""``create_app(settings)``: the Litestar app with ingest routes, query routes, or both.

create_app(settings)                 everything on one port
create_app(settings, query=False)    the ingest (webhook) server alone
create_app(settings, ingest=False)   the query (API) server alone
create_app(settings, ingest=False, dashboard=True)
                                     the dashboard server: query routes, page and feed
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Response, get
from litestar._openapi.schema_generation import SchemaCreator
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, Schema, SecurityScheme
from litestar.router import Router
from litestar.types import ASGIApp, ControllerRouterHandler, Guard, Receive, Send
from litestar.types import Scope as ASGIScope
from litestar.typing import FieldDefinition

from api.admin import admin_routes
from api.auth import Scope, TokenStore
from api.dashboard import Dashboard
from api.errors import ApiError, exception_handlers
from api.fast import SingleReport
from api.ingest import Publisher, ingest_routes, limits_from
from api.producer import ReportProducer
from api.query import QueryService
from api.signing import Signatures
from dataflows.rules import Rules
from fleetpulse.reload import ActiveConfig, ConfigWatcher, config_hash
from fleetpulse.settings import Settings
from observability.http import ObservabilityMiddleware
from observability.logs import set_log_level
from observability.metrics import ApiMetrics
from observability.tracing import setup_tracing

__all__ = ["create_app"]


def _refusal(tokens: TokenStore, needs: Scope, authorization: str | None) -> ApiError | None:
    """The 401/403 answer for an ``Authorization`` header that does not grant ``needs``."""
    failure = tokens.check(authorization, needs)
    if failure is None:
        return None
    headers = {"WWW-Authenticate": 'Bearer realm="fleetpulse"'} if failure.status == 401 else {}
    return ApiError(failure.status, failure.error, failure.detail, headers=headers)


def _guard(tokens: TokenStore, needs: Scope) -> Guard:
    # Async, so Litestar calls it on the event loop: a sync guard runs in a worker thread,
    # a thread hop per request for a few microseconds of hashing.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        refused = _refusal(tokens, needs, connection.headers.get("authorization"))
        if refused is not None:
            raise refused

    return guard


class _RequireScope(ASGIMiddleware):
    """The guard's check as route middleware, for the write routes (the hot path).

    Litestar passes every guard a copy of the route handler (~13 µs per request here,
    a tenth of a single post's time); middleware costs no copy. A refusal is raised as
    the guard's would be and answered by the same exception handler.
    """

    scopes = ("http",)  # type: ignore[assignment]

    def __init__(self, tokens: TokenStore, needs: Scope) -> None:
        self.tokens = tokens
        self.needs = needs

    async def handle(
        self, scope: ASGIScope, receive: Receive, send: Send, next_app: ASGIApp
    ) -> None:
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        refused = _refusal(self.tokens, self.needs, authorization)
        if refused is not None:
            raise refused
        await next_app(scope, receive, send)


class FleetpulseApp(Litestar):
    """Litestar with the single-report post answered first (:mod:`api.fast`)."""

    single_report: SingleReport | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        fast = self.single_report
        if fast is not None and fast.wants(scope):
            await fast(scope, receive, send, super().__call__)
            return
        await super().__call__(scope, receive, send)


def _config_watcher(settings: Settings, metrics: ApiMetrics) -> ConfigWatcher | None:
    """The app's watcher of ``FLEETPULSE_CONFIG_DIR`` (started with the app's lifespan),
    shown in its metrics; None (and the start-up config shown) when the setting is empty.

    Files are checked with the dataflow's pair checks (``Rules``), so the API and the
    flow agree on which file is bad. Hot for the API: the time bounds of ingest
    (``max_future_s``, ``max_age_s``) and the log level; the thresholds are the flow's.
    """
    if not settings.config_dir:
        metrics.config.observe(None, ActiveConfig(settings=settings, hash=config_hash(settings)))
        return None
    watcher = ConfigWatcher(settings, check=Rules.from_settings, observe=metrics.config.observe)
    watcher.subscribe(lambda active: set_log_level(active.settings.log_level))
    return watcher


def create_app(
    settings: Settings,
    *,
    ingest: bool = True,
    query: bool = True,
    dashboard: bool = False,
    producer: ReportProducer | None = None,
) -> Litestar:
    """Build the app. Raises ConfigError for bad token settings or a bad config file
    (``FLEETPULSE_CONFIG_DIR``) before serving anything."""
    metrics = ApiMetrics()
    watcher = _config_watcher(settings, metrics)
    if watcher is not None:  # the file's values go over the environment's
        settings = watcher.current.settings
        set_log_level(settings.log_level)
    started = ActiveConfig(settings=settings, hash=config_hash(settings))

    def active() -> ActiveConfig:
        return started if watcher is None else watcher.current

    def live() -> Settings:
        return active().settings

    tokens = TokenStore.parse(settings.api_tokens)
    api_tracer = setup_tracing(settings, "fleetpulse-api").get_tracer("fleetpulse.api")
    ingest_tracer = setup_tracing(settings, "fleetpulse-ingest").get_tracer("fleetpulse.ingest")
    handlers: list[ControllerRouterHandler] = []
    owned_producer = producer is None and ingest
    state: dict[str, ReportProducer] = {}
    # Spans of the ingest side's routes are the ingest service's (their templates below).
    observe = ObservabilityMiddleware(
        api_tracer, metrics, ingest_tracer, trust=tokens.trusts(settings.trace_trust)
    )
    fast: SingleReport | None = None

    if ingest:
        if producer is None:
            producer = ReportProducer(settings)
        state["producer"] = producer
        publish = Publisher(settings, producer, ingest_tracer, metrics)
        signatures = Signatures.parse(settings.webhook_secrets, settings.webhook_tolerance_s)
        limits = limits_from(settings)
        fast = SingleReport(settings, tokens, publish, observe, metrics, live, signatures, limits)
        # One producer for reports and control records: both are acknowledged the same way.
        guarded: list[tuple[Scope, list[ControllerRouterHandler]]] = [
            ("ingest", ingest_routes(settings, publish, live, signatures, limits)),
            ("admin", admin_routes(settings, producer, ingest_tracer)),
        ]
        for scope, routes in guarded:
            router = Router(
                "/",
                route_handlers=routes,
                middleware=[_RequireScope(tokens, scope)],
                security=[{"bearer": []}],
            )
            observe.ingest_routes |= {route.path for route in router.routes}
            handlers.append(router)

    service = QueryService(settings, api_tracer) if query or dashboard else None
    if service is not None:
        handlers.append(service.router(guards=[_guard(tokens, "read")]))
    board = Dashboard(settings, service) if dashboard and service is not None else None
    if board is not None:
        handlers += board.routes(guards=[_guard(tokens, "read")])

    @get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @get("/readyz", summary="Readiness: the backends this server needs answer")
    async def readyz() -> Response[dict[str, str]]:
        """200 when Kafka (ingest) and Redis (query) answer; 503 naming what does not.
        ``config`` is the hash of the active hot settings (``fleetpulse_config_info``)."""
        config = {"config": active().hash}
        problems: dict[str, str] = {}
        if "producer" in state:
            problem = await asyncio.to_thread(state["producer"].ready)
            if problem:
                problems["kafka"] = problem
        if service is not None and (problem := await service.ready()):
            problems["redis"] = problem
        if problems:
            return Response({"status": "unready", **problems, **config}, status_code=503)
        return Response({"status": "ready", **config}, status_code=200)

    @get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
    async def metrics_route() -> Response[bytes]:
        """Requests, latency, accepted and rejected reports, in Prometheus text format."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    handlers += [healthz, readyz, metrics_route]

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        if owned_producer and producer is not None:
            # Made with the app; made again if a server runs the lifespan a second time.
            await asyncio.to_thread(producer.start)
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            if watcher is not None:
                await asyncio.to_thread(watcher.stop)
            if owned_producer and producer is not None:
                await asyncio.to_thread(producer.close)

    app = FleetpulseApp(
        route_handlers=handlers,
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="fleetpulse",
            version="1.0.0",
            path="/schema",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
        ),
        lifespan=[
            lifespan,
            *([service.lifespan] if service is not None else []),
            *([board.lifespan] if board is not None else []),
        ],
        middleware=[observe],
        plugins=[ClosedStructs()],
        state=State({"metrics": metrics}),
    )
    app.single_report = fast
    return app


class ClosedStructs(StructSchemaPlugin):
    """Litestar's schema of a msgspec Struct, with ``additionalProperties: false`` when the
    Struct refuses unknown fields (``forbid_unknown_fields``, as the wire structs do), so
    a body with an extra field is not schema-valid in the document either; and with the
    constraints on a list's items (a report's ``errors``: each at most 64 characters),
    which Litestar leaves out (schemathesis sent a longer one as schema-valid). Made when
    the document is, not at start-up."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return super().is_plugin_supported_field(field_definition) and bool(
            field_definition.type_.__struct_config__.forbid_unknown_fields
        )

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        info = msgspec.inspect.type_info(field_definition.type_)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            prop = (schema.properties or {}).get(field.encode_name)
            kind = field.type
            if isinstance(kind, msgspec.inspect.Metadata):
                kind = kind.type
            if isinstance(prop, Schema) and isinstance(kind, msgspec.inspect.ListType):
                _constrain_items(prop, kind.item_type)
        return schema


def _constrain_items(array: Schema, item: msgspec.inspect.Type) -> None:
    """The string constraints of ``item`` (msgspec ``Meta``) on ``array``'s item schema."""
    if isinstance(item, msgspec.inspect.Metadata):
        item = item.type
    if isinstance(item, msgspec.inspect.StrType) and isinstance(array.items, Schema):
        array.items.max_length = item.max_length
        array.items.min_length = item.min_length
        array.items.pattern = item.pattern
