"""Query routes (the API server): live state, history, stats, fleet summary, alerts, stream.

Every route reads Redis through the state readers, whose calls do bounded work (no
KEYS, no keyspace walk; the summary is the sink's counters). The GET routes await
:class:`state.AsyncRedisStateReader` on the event loop: a read is one short round trip
or a few, so a worker thread per request would cost more than the read. The event
stream keeps the blocking :class:`state.RedisStateReader` in threads (its XREAD blocks).
:class:`QueryService` owns both clients and the change-stream hub for one app: they are
made when the app starts (its lifespan) and closed when it stops.

A robot's live state is sent as the LiveState JSON the sink stored, byte for byte
(the reader's ``get_raw`` / ``list_robots_raw``): decoding it into a LiveState only
to encode the same JSON again would add nothing but time. The documented schemas stay
the route's return types (``Response[LiveState]``, ``Response[RobotPage]``).

    GET /v1/robots                    status, site, online, battery_lt; cursor + limit
    GET /v1/robots/{robot_id}         live state (404 for a robot that never reported)
    GET /v1/robots/{robot_id}/history applied reports, newest first; limit, since
    GET /v1/robots/{robot_id}/stats   closed windows, newest first; limit, since
    GET /v1/fleet/summary             counts by status, online/offline, low battery, site
    GET /v1/alerts                    robot_id, kind, since, limit; newest first
    GET /v1/incidents                 robot_id, rule, state, severity, since, limit;
                                      newest opened first (the alert rules' incidents)
    GET /v1/stream                    server-sent events (api.stream)
    GET /v1/export/{kind}             history, stats or alerts as CSV/NDJSON, streamed
                                      and resumable by cursor (api.export)

Paging: ``next_cursor`` is the id of the last robot the page examined, and the next
page lists robots after it; robots come in id order, so a robot that changes while a
client pages is neither repeated nor skipped unless it enters or leaves the filter
meanwhile. A page may hold fewer than ``limit`` robots (even none) while
``next_cursor`` is set, because one request examines a bounded number of candidates;
the listing ends when it is null. A query parameter a route does not take is a 422,
so a misspelt filter never silently widens the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from inspect import isawaitable
from typing import Annotated, Any, cast

import anyio
import anyio.to_thread
import msgspec
import redis
import redis.asyncio
from litestar import Litestar, Response, get
from litestar.constants import RESERVED_KWARGS
from litestar.enums import MediaType, ParamType
from litestar.exceptions import ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import PathParameter, QueryParameter
from litestar.router import Router
from litestar.types import (
    BeforeRequestHookHandler,
    ControllerRouterHandler,
    ExceptionHandler,
    Guard,
)
from opentelemetry import trace

from api.errors import AnyRequest, ApiError, ErrorBody, error_response, validation_error
from api.export import export_routes
from api.params import RFC3339_PATTERN, check_times
from api.stream import ChangeHub, stream_routes
from fleetpulse.alert_rules import RULE_NAME_PATTERN, Incident, IncidentState, Severity
from fleetpulse.errors import InvalidQuery
from fleetpulse.schema import (
    ROBOT_ID_PATTERN,
    Alert,
    AlertKind,
    LiveState,
    RobotReport,
    Status,
    WindowStats,
)
from fleetpulse.settings import Settings
from observability.tracing import TracedCalls
from state import (
    AsyncRedisStateReader,
    AsyncStateReader,
    FleetSummary,
    Keys,
    RedisStateReader,
    StateReader,
    close_async,
    connect_reader,
    connect_reader_async,
)
from state.reader import MAX_PAGE

__all__ = [
    "AlertList",
    "IncidentList",
    "QueryService",
    "ReportList",
    "RobotPage",
    "WindowList",
    "query_exception_handlers",
    "reject_unknown_parameters",
    "route_checks",
]

log = logging.getLogger("fleetpulse.api.query")

READY_TIMEOUT_S = 2.0


# --- response bodies ----------------------------------------------------------------------
class RobotPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of robots in id order."""

    items: list[LiveState]
    next_cursor: str | None  # pass as `cursor` for the next page; null: the listing is complete


class ReportList(msgspec.Struct, frozen=True, kw_only=True):
    """Applied reports of one robot, newest ``(boot, seq)`` first."""

    items: list[RobotReport]


class WindowList(msgspec.Struct, frozen=True, kw_only=True):
    """Closed event-time windows of one robot, newest first."""

    items: list[WindowStats]


class AlertList(msgspec.Struct, frozen=True, kw_only=True):
    """Alerts, newest first."""

    items: list[Alert]


class IncidentList(msgspec.Struct, frozen=True, kw_only=True):
    """Incidents (each as its newest version), newest opened first."""

    items: list[Incident]


# --- parameters ---------------------------------------------------------------------------
RobotIdPath = Annotated[
    str,
    PathParameter(
        pattern=ROBOT_ID_PATTERN,
        description="Robot id: 1-64 characters, letters, digits and _ . : - (not first).",
        examples=[Example(value="amr-7")],
    ),
]
RobotIdQuery = Annotated[
    str | None,
    QueryParameter(
        pattern=ROBOT_ID_PATTERN,
        description="Only this robot's alerts.",
        examples=[Example(value="amr-7")],
    ),
]
SiteQuery = Annotated[
    str | None,
    QueryParameter(
        pattern=ROBOT_ID_PATTERN,
        description="Only robots of this site.",
        examples=[Example(value="plant-1")],
    ),
]
Since = Annotated[
    datetime | None,
    QueryParameter(
        description="RFC 3339 time with a UTC offset (e.g. 2025-06-01T12:00:00Z); "
        "a time without an offset, or a number, is refused (422).",
        schema_extra={"pattern": RFC3339_PATTERN},  # documented; checked in the hook
    ),
]
BatteryLt = Annotated[
    float | None,
    QueryParameter(description="Only robots whose battery (%) is below this finite number."),
]
Cursor = Annotated[
    str | None,
    QueryParameter(
        pattern=ROBOT_ID_PATTERN,
        description="`next_cursor` of the previous page (robots after this id); omit for "
        "the first page.",
    ),
]


def _limit() -> Any:
    return QueryParameter(ge=1, le=MAX_PAGE, description=f"At most this many items (1-{MAX_PAGE}).")


def _query_names(handler: HTTPRouteHandler) -> frozenset[str]:
    names = set()
    for name, field in handler.parsed_fn_signature.parameters.items():
        if field.kwarg_definition is None and name in RESERVED_KWARGS:
            continue  # the request, its headers...: injected by Litestar, never a parameter
        kind = getattr(field.kwarg_definition, "param_type", ParamType.QUERY)
        if kind is ParamType.QUERY:
            definition = field.kwarg_definition
            names.add(
                getattr(definition, "query", None) or getattr(definition, "name", None) or name
            )
    return frozenset(names)


def reject_unknown_parameters(request: AnyRequest) -> None:
    """422 for a query parameter the route does not take (a typo must not widen a filter),
    and for a ``since`` or ``until`` that is not an RFC 3339 time with an offset (the
    schema's format; Litestar alone would also take a number of seconds)."""
    if not request.scope["query_string"]:
        return  # most requests: nothing to parse
    params = request.query_params
    known = _query_names(request.route_handler)
    unknown = sorted(set(params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise ApiError(
            422,
            "invalid_parameter",
            f"{unknown[0]}: not a parameter of this route (it takes: {takes})",
            unknown,
        )
    check_times(params)


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    what = {
        400: "Malformed request",
        401: "Missing or unknown bearer token",
        403: "The token's scope is not `read`",
        404: "No robot with this id has reported",
        422: "A parameter is malformed or out of range; `fields` names it",
        503: "Redis is unreachable; retry later",
    }
    return {
        s: ResponseSpec(data_container=ErrorBody, description=what[s], generate_examples=False)
        for s in (400, 401, 403, 422, 503, *statuses)
    }


def route_checks(guards: Sequence[Guard]) -> BeforeRequestHookHandler:
    """The routes' guards, then :func:`reject_unknown_parameters`, as one async hook.

    Litestar would run each guard after copying the route handler, and a sync guard or
    hook in a worker thread: a copy and thread hops per request around a few
    microseconds of hashing. Here they run inline on the event loop, in Litestar's
    order (guards, then the before-request hook), with the same errors.
    """

    async def check(request: AnyRequest) -> None:
        handler = request.route_handler
        for guard in guards:
            result = guard(request, handler)
            if isawaitable(result):
                await result
        reject_unknown_parameters(request)

    return check


# --- the routes ---------------------------------------------------------------------------
def _json(body: bytes) -> Response[Any]:
    """A 200 whose body is ``body``, JSON already (of the type the route declares)."""
    return Response(body, media_type=MediaType.JSON)


def page_json(items: Sequence[bytes], next_cursor: str | None) -> bytes:
    """A :class:`RobotPage` as JSON, from each robot's stored LiveState JSON: the bytes
    ``msgspec.json.encode(RobotPage(...))`` would give for the decoded states."""
    cursor = b"null" if next_cursor is None else msgspec.json.encode(next_cursor)
    return b'{"items":[%s],"next_cursor":%s}' % (b",".join(items), cursor)


def _not_found(robot_id: str) -> ApiError:
    return ApiError(
        404, "not_found", f"no robot {robot_id!r} has reported; check the id (GET /v1/robots)"
    )


def query_routes(service: QueryService) -> list[ControllerRouterHandler]:
    """The GET routes of the API server, reading through ``service.reader``."""

    @get(
        "/v1/robots",
        summary="List robots",
        description="Robots matching every filter given, in robot-id order, one page at "
        "a time. A page may be short (even empty) while `next_cursor` is set; follow "
        "`next_cursor` until it is null.",
        responses=_errors(),
    )
    async def list_robots(
        status: Annotated[Status | None, QueryParameter(description="Only this status.")] = None,
        site: SiteQuery = None,
        online: Annotated[bool | None, QueryParameter(description="Only online (offline).")] = None,
        battery_lt: BatteryLt = None,
        cursor: Cursor = None,
        limit: Annotated[int, _limit()] = 100,
    ) -> Response[RobotPage]:
        """Robots matching the filters, one page at a time."""
        items, next_cursor = await service.api_reader.list_robots_raw(
            status=status,
            site=site,
            online=online,
            battery_lt=battery_lt,
            cursor=cursor,
            limit=limit,
        )
        return _json(page_json(items, next_cursor))

    @get(
        "/v1/robots/{robot_id:str}",
        summary="Live state of one robot",
        responses=_errors(404),
    )
    async def robot(robot_id: RobotIdPath) -> Response[LiveState]:
        """The newest applied report with last_seen, online and status_since."""
        state = await service.api_reader.get_raw(robot_id)
        if state is None:
            raise _not_found(robot_id)
        return _json(state)

    @get(
        "/v1/robots/{robot_id:str}/history",
        summary="Recent applied reports of one robot",
        responses=_errors(404),
    )
    async def history(
        robot_id: RobotIdPath,
        limit: Annotated[int, _limit()] = 50,
        since: Since = None,
    ) -> ReportList:
        """Applied reports, newest first; ``since`` keeps reports with ``ts`` at or after it."""
        reader = service.api_reader
        items = await reader.history(robot_id, limit=limit, since=since)
        if not items and await reader.get_raw(robot_id) is None:
            raise _not_found(robot_id)
        return ReportList(items=items)

    @get(
        "/v1/robots/{robot_id:str}/stats",
        summary="Closed 1-minute windows of one robot",
        responses=_errors(404),
    )
    async def stats(
        robot_id: RobotIdPath,
        limit: Annotated[int, _limit()] = 60,
        since: Since = None,
    ) -> WindowList:
        """Closed windows, newest first; ``since`` keeps windows that start at or after it."""
        reader = service.api_reader
        items = await reader.stats(robot_id, limit=limit, since=since)
        if not items and await reader.get_raw(robot_id) is None:
            raise _not_found(robot_id)
        return WindowList(items=items)

    @get(
        "/v1/fleet/summary",
        summary="Fleet-wide counts",
        responses=_errors(),
    )
    async def summary() -> FleetSummary:
        """Counts by status, online/offline, low battery and site (kept by the sink)."""
        return await service.api_reader.summary()

    @get(
        "/v1/alerts",
        summary="Alerts",
        description="Newest first. With `robot_id` the robot's alerts are read by event "
        "time; without it the alert stream is read newest-written first and one request "
        "examines a bounded number of entries, so a `since` far back may return fewer.",
        responses=_errors(),
    )
    async def alerts(
        robot_id: RobotIdQuery = None,
        kind: Annotated[AlertKind | None, QueryParameter(description="Only this kind.")] = None,
        since: Since = None,
        limit: Annotated[int, _limit()] = 100,
    ) -> AlertList:
        """Alerts matching the filters, newest first."""
        reader = service.api_reader
        items = await reader.alerts(robot_id=robot_id, kind=kind, since=since, limit=limit)
        return AlertList(items=items)

    @get(
        "/v1/incidents",
        summary="Incidents of the alert rules",
        description="Each incident as its newest version (open, acknowledged, closed), newest "
        "opened first. Read by opened time from the robot's incidents with `robot_id`, from "
        "the open ones with `state=open`, else from the fleet's newest; the other filters "
        "examine a bounded number of entries, so a rare match far back may be missed.",
        responses=_errors(),
    )
    async def incidents(
        robot_id: RobotIdQuery = None,
        rule: Annotated[
            str | None, QueryParameter(pattern=RULE_NAME_PATTERN, description="Only this rule.")
        ] = None,
        incident_state: Annotated[
            IncidentState | None,
            QueryParameter(name="state", description="Only open or only closed ones."),
        ] = None,
        severity: Annotated[
            Severity | None, QueryParameter(description="Only this severity.")
        ] = None,
        since: Since = None,
        limit: Annotated[int, _limit()] = 100,
    ) -> IncidentList:
        """Incidents matching the filters, newest opened first."""
        items = await service.api_reader.incidents(
            robot_id=robot_id,
            rule=rule,
            state=incident_state,
            severity=severity,
            since=since,
            limit=limit,
        )
        return IncidentList(items=items)

    return [list_robots, robot, history, stats, summary, alerts, incidents]


# --- errors of the query routes -----------------------------------------------------------
# Mounted on the query router only, so the ingest routes answer exactly as before;
# api.errors' table is where they would go if both sides should share them.
def _on_invalid_query(_: AnyRequest, exc: InvalidQuery) -> Response[ErrorBody]:
    return error_response(
        ApiError(422, "invalid_parameter", f"{exc.parameter}: {exc.detail}", [exc.parameter])
    )


def _on_validation(_: AnyRequest, exc: ValidationException) -> Response[ErrorBody]:
    return error_response(validation_error(exc))


def _on_redis_down(_: AnyRequest, exc: redis.RedisError) -> Response[ErrorBody]:
    log.warning("Redis unreachable: %s", exc)
    return error_response(
        ApiError(
            503,
            "unavailable",
            f"Redis is unreachable ({exc}); retry later",
            headers={"Retry-After": "1"},
        )
    )


query_exception_handlers: dict[int | type[Exception], ExceptionHandler[Any]] = {
    InvalidQuery: _on_invalid_query,
    ValidationException: _on_validation,
    redis.ConnectionError: _on_redis_down,
    redis.TimeoutError: _on_redis_down,
}


# --- the service --------------------------------------------------------------------------
class QueryService:
    """The Redis clients, readers and change hub of one app, alive during its lifespan."""

    def __init__(self, settings: Settings, tracer: trace.Tracer | None = None) -> None:
        """Nothing connects yet; :meth:`lifespan` makes the clients when the app starts."""
        self._settings = settings
        self._tracer = tracer
        self._client: redis.Redis | None = None
        self._async_client: redis.asyncio.Redis | None = None
        self._reader: StateReader | None = None
        self._api_reader: AsyncStateReader | None = None
        self._plans: AsyncRedisStateReader | None = None
        self._hub: ChangeHub | None = None

    @property
    def reader(self) -> StateReader:
        """The blocking reader (the event stream's, in threads); 503 outside the lifespan."""
        if self._reader is None:
            raise ApiError(503, "unavailable", "the query server is starting or stopping")
        return self._reader

    @property
    def api_reader(self) -> AsyncStateReader:
        """The reader the GET routes await; 503 outside the app's lifespan."""
        if self._api_reader is None:
            raise ApiError(503, "unavailable", "the query server is starting or stopping")
        return self._api_reader

    @property
    def plans(self) -> AsyncRedisStateReader:
        """The untraced async reader whose ``run`` the export's many page reads go through
        (a span per page would outnumber the rows); 503 outside the app's lifespan."""
        if self._plans is None:
            raise ApiError(503, "unavailable", "the query server is starting or stopping")
        return self._plans

    @property
    def hub(self) -> ChangeHub:
        """The change-stream hub; 503 outside the app's lifespan."""
        if self._hub is None:
            raise ApiError(503, "unavailable", "the query server is starting or stopping")
        return self._hub

    def routes(self) -> list[ControllerRouterHandler]:
        """Every query route, including the event stream."""
        return [
            *query_routes(self),
            *stream_routes(self, _errors()),
            *export_routes(
                lambda: self.plans.run,
                Keys(self._settings.redis_prefix),
                self._robot_exists,
                _errors(404),
            ),
        ]

    async def _robot_exists(self, robot_id: str) -> bool:
        return await self.api_reader.get_raw(robot_id) is not None

    def router(self, guards: Sequence[Guard]) -> Router:
        """The routes with their error mapping, guards, parameter check and bearer security.

        ``guards`` run in the routes' before-request hook (:func:`route_checks`), not as
        Litestar guards.
        """
        return Router(
            "/",
            route_handlers=self.routes(),
            exception_handlers=query_exception_handlers,
            before_request=route_checks(guards),
            security=[{"bearer": []}],
        )

    async def ready(self) -> str | None:
        """None when Redis answers a PING in time, else what is wrong."""
        client = self._async_client
        if client is None:
            return "not started"
        try:
            with anyio.fail_after(READY_TIMEOUT_S):
                await client.ping()
        except TimeoutError:
            return f"no answer to PING within {READY_TIMEOUT_S:g}s"
        except redis.RedisError as exc:
            return f"unreachable: {exc}"
        return None

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        """Make the Redis clients (a replica with Sentinel + read_from_replicas), the
        readers and the hub."""
        client = connect_reader(self._settings)  # both connect on first use
        async_client = connect_reader_async(self._settings)
        reader = RedisStateReader(client, self._settings)
        api_reader = AsyncRedisStateReader(async_client, self._settings, reader)
        hub = ChangeHub(reader)
        task = asyncio.get_running_loop().create_task(hub.run(), name="change-stream tail")
        self._client, self._async_client, self._hub = client, async_client, hub
        self._reader, self._api_reader, self._plans = reader, api_reader, api_reader
        if self._tracer is not None:
            # Each read becomes a Redis client span under the request's server span.
            self._reader = cast(StateReader, TracedCalls(reader, self._tracer, names=_SPANS))
            self._api_reader = cast(
                AsyncStateReader, TracedCalls(api_reader, self._tracer, names=_SPANS)
            )
        try:
            yield
        finally:
            self._reader = self._api_reader = self._plans = self._hub = None
            await hub.stop(task)
            self._client = self._async_client = None
            await close_async(async_client)
            await anyio.to_thread.run_sync(client.close)


# Spans name the read, not the form of its answer.
_SPANS = {"get_raw": "get", "list_robots_raw": "list_robots"}
