"""The fleet dashboard: a page on ``FLEETPULSE_DASHBOARD_PORT`` and the routes it reads.

    GET /                           the page (no data in it; it asks for a read token)
    GET /ui/...                     its script and style, served from ``api/static``
    GET /v1/dashboard/feed          one SSE connection with everything live (below)
    GET /v1/dashboard/pipeline      the pipeline figures now (:mod:`api.pipeline`)
    GET /v1/dashboard/config        what the page needs to know of the settings
    GET /v1/traces?robot_id=...     a robot's newest traces, as waterfalls (:mod:`api.traces`)
    GET /v1/traces/{trace_id}       one trace

The dashboard server is the query server plus these: every ``/v1`` route needs a read
token, which the page keeps in session storage and sends as ``Authorization``; the
page itself and its files are public and hold nothing.

The feed is ``/v1/stream`` (the same events, ids, ``Last-Event-ID`` resume and
``reset``) with two more events every ``dashboard_tick_s``, which carry no ``id:`` and
so never move the client's resume point::

    event: pipeline     data: Pipeline JSON (rates, lag, dead letters, freshness)
    event: summary      data: FleetSummary JSON (GET /v1/fleet/summary)

so a page holds one connection however many panels it shows, and polls nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import msgspec
import redis
from litestar import Litestar, Response, get
from litestar.params import QueryParameter
from litestar.response import File, Stream
from litestar.router import Router
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler, Guard

from api.errors import ApiError
from api.pipeline import Pipeline, PipelineWatch
from api.query import QueryService, query_exception_handlers, route_checks
from api.stream import (
    SSE_HEADERS,
    LastEventIdHeader,
    LastEventIdQuery,
    client_stream,
)
from api.traces import TraceList, TraceSource, TraceView
from fleetpulse.schema import ROBOT_ID_PATTERN
from fleetpulse.settings import Settings

__all__ = ["STATIC_DIR", "Dashboard", "DashboardConfig", "live_feed"]

log = logging.getLogger("fleetpulse.api.dashboard")

STATIC_DIR = Path(__file__).parent / "static"
PAGE = STATIC_DIR / "index.html"
# The page runs only its own files: no inline script, nothing from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class DashboardConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The settings the page draws with."""

    low_battery_pct: float
    offline_after_s: float
    tick_s: float
    jaeger_ui: str | None  # base URL of a Jaeger web UI, if one is configured
    trace_sample_ratio: float


_summary_enc = msgspec.json.Encoder()


def _event(kind: str, body: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n"


async def live_feed(
    changes: AsyncIterator[bytes], tick: Callable[[], Awaitable[bytes]], tick_s: float
) -> AsyncIterator[bytes]:
    """``changes`` as they come, with ``tick()``'s message at once and every ``tick_s``.

    The change stream is read one message ahead in a task, so a tick is never held up by
    a quiet stream and a message never by a tick; closing this closes ``changes``.
    """
    it = aiter(changes)
    pending: asyncio.Future[bytes] = asyncio.ensure_future(anext(it))
    due = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, due - time.monotonic()))
            if done:
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                yield chunk
                pending = asyncio.ensure_future(anext(it))
            if time.monotonic() >= due:
                yield await tick()
                due = time.monotonic() + tick_s
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
            await pending
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


TraceRobot = Annotated[
    str,
    QueryParameter(
        description="The robot whose traces to find (its reports' ingest spans).",
        pattern=ROBOT_ID_PATTERN,
        max_length=64,
    ),
]
TraceLimit = Annotated[int, QueryParameter(description="Most traces.", ge=1, le=50)]


class Dashboard:
    """The page, the feed and the trace and pipeline routes over one query service."""

    def __init__(self, settings: Settings, service: QueryService) -> None:
        self.settings = settings
        self.service = service
        self.pipeline = PipelineWatch(settings.dashboard_metrics_urls)
        self.traces = TraceSource(settings.jaeger_api, settings.jaeger_ui_url)
        self.config = DashboardConfig(
            low_battery_pct=settings.low_battery_pct,
            offline_after_s=settings.offline_after_s,
            tick_s=settings.dashboard_tick_s,
            jaeger_ui=settings.jaeger_ui_url or None,
            trace_sample_ratio=settings.trace_sample_ratio,
        )

    async def _tick(self) -> bytes:
        figures = await self.pipeline.current(max_age_s=self.settings.dashboard_tick_s / 2)
        out = _event("pipeline", msgspec.json.encode(figures))
        try:
            summary = await self.service.api_reader.summary()
        except (redis.RedisError, ApiError) as exc:
            log.warning("the dashboard feed could not read the summary: %s", exc)
        else:
            out += _event("summary", _summary_enc.encode(summary))
        return out

    def routes(self, guards: Sequence[Guard]) -> list[ControllerRouterHandler]:
        """The public page and files, and the ``/v1`` routes behind ``guards``."""
        dashboard = self

        @get("/", include_in_schema=False)
        async def page() -> File:
            return File(
                PAGE,
                filename="index.html",
                media_type="text/html",
                content_disposition_type="inline",
                headers=PAGE_HEADERS,
            )

        @get(
            "/v1/dashboard/feed",
            summary="The dashboard's live feed (server-sent events)",
            media_type="text/event-stream",
            description="`/v1/stream`'s events (resumable with `Last-Event-ID`) and, every "
            "`FLEETPULSE_DASHBOARD_TICK_S`, `event: pipeline` and `event: summary` without "
            "an id.",
        )
        async def feed(
            last_event_id: LastEventIdQuery = None,
            last_event_id_header: LastEventIdHeader = None,
        ) -> Stream:
            changes = await client_stream(dashboard.service, last_event_id_header, last_event_id)
            body = live_feed(changes, dashboard._tick, dashboard.settings.dashboard_tick_s)
            return Stream(body, media_type="text/event-stream", headers=SSE_HEADERS)

        @get("/v1/dashboard/pipeline", summary="Pipeline figures from the processes' metrics")
        async def pipeline() -> Pipeline:
            """Reports/s accepted and applied, lag per partition, dead letters, freshness."""
            return await dashboard.pipeline.current(max_age_s=1.0)

        @get("/v1/dashboard/config", summary="Settings the dashboard draws with")
        async def config() -> DashboardConfig:
            """Low-battery threshold, offline delay, feed tick, Jaeger UI link."""
            return dashboard.config

        @get("/v1/traces", summary="A robot's newest traces, from Jaeger")
        async def traces(robot_id: TraceRobot, limit: TraceLimit = 10) -> TraceList:
            """Traces whose ingest spans carry ``robot_id``, newest first, as waterfalls."""
            return await dashboard.traces.search(robot_id, limit)

        @get("/v1/traces/{trace_id:str}", summary="One trace, from Jaeger")
        async def trace(trace_id: str) -> Response[TraceView]:
            """One trace by id (hex), as a waterfall; 404 when Jaeger holds none."""
            found = await dashboard.traces.get(trace_id)
            if found is None:
                raise ApiError(
                    404, "not_found", f"Jaeger holds no trace {trace_id!r} (kept in memory only)"
                )
            return Response(found)

        data = Router(
            "/",
            route_handlers=[feed, pipeline, config, traces, trace],
            exception_handlers=query_exception_handlers,
            before_request=route_checks(guards),
            security=[{"bearer": []}],
        )
        files = create_static_files_router(
            "/ui", directories=[STATIC_DIR], include_in_schema=False, send_as_attachment=False
        )
        return [page, files, data]

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        """Close the HTTP clients when the app stops."""
        try:
            yield
        finally:
            await self.pipeline.close()
            await self.traces.close()
