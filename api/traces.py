"""Traces for the dashboard, read from Jaeger's query API and laid out as a waterfall.

The local Jaeger is built from its Go module, which carries no web UI, so the dashboard
draws traces itself. :class:`TraceSource` asks Jaeger (``/api/traces`` by the
``robot_id`` attribute the ingest spans carry, or ``/api/traces/{id}``) and
:func:`waterfall` turns Jaeger's JSON into :class:`TraceView`: spans oldest first,
each with its service, its start as an offset from the trace's start, its duration,
its parent and its attributes (partition, offset, boot, seq, ...).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import msgspec

from fleetpulse.errors import InvalidQuery, TracesUnavailable

__all__ = ["SpanView", "TraceList", "TraceSource", "TraceView", "check_trace_id", "waterfall"]

SEARCH_SERVICE = "fleetpulse-ingest"  # the service whose spans carry robot_id
LOOKBACK = "6h"
_TRACE_ID = re.compile(r"^[0-9a-f]{1,32}$")

TagValue = str | int | float | bool


class SpanView(msgspec.Struct, frozen=True, kw_only=True):
    """One span of a trace as the waterfall draws it (times in microseconds)."""

    span_id: str
    parent_id: str | None  # None: a root of this trace
    service: str
    name: str
    offset_us: int  # start, after the trace's first span started
    duration_us: int
    error: bool
    tags: dict[str, TagValue]


class TraceView(msgspec.Struct, frozen=True, kw_only=True):
    """A whole trace: when it started, how long it took, its spans oldest first."""

    trace_id: str
    started_us: int  # unix microseconds of the first span's start
    duration_us: int  # first start to last end
    services: list[str]
    root: str  # the first span's "service: name"
    robot_id: str | None
    spans: list[SpanView]


class TraceList(msgspec.Struct, frozen=True, kw_only=True):
    """Traces found, newest first, and where a Jaeger UI shows them (if there is one)."""

    items: list[TraceView]
    jaeger_ui: str | None


def check_trace_id(trace_id: str) -> str:
    """A trace id in Jaeger's spelling (lower-case hex); InvalidQuery if it is not one."""
    value = trace_id.strip().lower()
    if not _TRACE_ID.fullmatch(value):
        raise InvalidQuery("trace_id", f"{trace_id!r} is not a trace id (1-32 hex digits)")
    return value.rjust(32, "0") if len(value) > 16 else value.rjust(16, "0")


def _tags(raw: list[dict[str, Any]]) -> dict[str, TagValue]:
    out: dict[str, TagValue] = {}
    for tag in raw:
        value = tag.get("value")
        if isinstance(value, str | int | float | bool):
            out[str(tag.get("key"))] = value
    return out


def waterfall(raw: dict[str, Any]) -> TraceView:
    """One trace of Jaeger's JSON (an element of ``data``) as a :class:`TraceView`."""
    processes = {pid: p.get("serviceName", "?") for pid, p in raw.get("processes", {}).items()}
    spans = sorted(raw.get("spans", []), key=lambda sp: (sp["startTime"], sp["spanID"]))
    if not spans:
        return TraceView(
            trace_id=raw.get("traceID", ""),
            started_us=0,
            duration_us=0,
            services=[],
            root="",
            robot_id=None,
            spans=[],
        )
    start = spans[0]["startTime"]
    ids = {sp["spanID"] for sp in spans}
    views: list[SpanView] = []
    robot: str | None = None
    for sp in spans:
        parents = [r["spanID"] for r in sp.get("references", []) if r.get("refType") == "CHILD_OF"]
        tags = _tags(sp.get("tags", []))
        if robot is None and isinstance(tags.get("robot_id"), str):
            robot = str(tags["robot_id"])
        error = tags.get("error") is True or tags.get("otel.status_code") == "ERROR"
        views.append(
            SpanView(
                span_id=sp["spanID"],
                parent_id=parents[0] if parents and parents[0] in ids else None,
                service=processes.get(sp.get("processID", ""), "?"),
                name=sp.get("operationName", ""),
                offset_us=int(sp["startTime"] - start),
                duration_us=int(sp.get("duration", 0)),
                error=error,
                tags=tags,
            )
        )
    end = max(sp["startTime"] + sp.get("duration", 0) for sp in spans)
    services = list(dict.fromkeys(v.service for v in views))
    return TraceView(
        trace_id=raw.get("traceID", ""),
        started_us=int(start),
        duration_us=int(end - start),
        services=services,
        root=f"{views[0].service}: {views[0].name}",
        robot_id=robot,
        spans=views,
    )


class TraceSource:
    """Jaeger's query API at ``base_url``, read with one async HTTP client."""

    def __init__(self, base_url: str, ui_url: str = "", timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.ui_url = ui_url.rstrip("/") or None
        self._timeout = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def _get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout)
        try:
            return await self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise TracesUnavailable(
                f"the Jaeger query API at {self.base_url} did not answer ({type(exc).__name__}: "
                f"{exc}); check that Jaeger runs (just stack-status) or FLEETPULSE_JAEGER_QUERY_URL"
            ) from exc

    def _data(self, response: httpx.Response) -> list[dict[str, Any]]:
        if response.status_code != 200:
            raise TracesUnavailable(
                f"the Jaeger query API at {self.base_url} answered {response.status_code}: "
                f"{response.text[:200]}"
            )
        data = response.json().get("data") or []
        return [t for t in data if isinstance(t, dict)]

    async def search(self, robot_id: str, limit: int) -> TraceList:
        """The newest ``limit`` traces whose ingest spans carry ``robot_id``."""
        response = await self._get(
            "/api/traces",
            {
                "service": SEARCH_SERVICE,
                "tags": json.dumps({"robot_id": robot_id}),
                "limit": str(limit),
                "lookback": LOOKBACK,
            },
        )
        views = [waterfall(t) for t in self._data(response)]
        views.sort(key=lambda v: v.started_us, reverse=True)
        return TraceList(items=views[:limit], jaeger_ui=self.ui_url)

    async def get(self, trace_id: str) -> TraceView | None:
        """One trace by id; None when Jaeger holds no such trace."""
        response = await self._get(f"/api/traces/{check_trace_id(trace_id)}")
        if response.status_code == 404:
            return None
        data = self._data(response)
        return waterfall(data[0]) if data else None

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
