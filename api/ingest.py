"""Ingest routes (the webhook server): validate reports, make them durable, answer 202.

A 202 means every report of the request is in Kafka (acks=all, idempotent producer).
A batch is all or nothing at validation: one invalid item rejects the batch and the
answer names its index. If Kafka cannot confirm in time the answer is 503 with
Retry-After and nothing is claimed; a retried request may then write a report twice,
which the dataflow drops by ``(boot, seq)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
from litestar import post
from litestar.types import ControllerRouterHandler
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from api.errors import AnyRequest, ApiError, schema_error
from api.producer import OutgoingReport, ReportProducer
from fleetpulse.schema import RobotReport, decode_report, decode_reports, encode
from fleetpulse.settings import Settings
from observability.metrics import ApiMetrics
from observability.tracing import traceparent_header

__all__ = ["Accepted", "ingest_routes"]


class Accepted(msgspec.Struct, frozen=True):
    """The answer to an accepted post: how many reports are now durable in Kafka."""

    accepted: int


def _require_json(request: AnyRequest) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {media_type or 'missing'}",
        )


def ingest_routes(
    settings: Settings, producer: ReportProducer, tracer: trace.Tracer, metrics: ApiMetrics
) -> list[ControllerRouterHandler]:
    """The POST routes, bound to one producer."""

    async def publish(reports: Sequence[RobotReport], route: str) -> None:
        with tracer.start_as_current_span(
            f"produce {settings.topic_reports}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": settings.topic_reports,
                "messaging.batch.message_count": len(reports),
                "http.route": route,
            },
        ) as span:
            traceparent = traceparent_header(span)
            ingest_ms = str(int(time.time() * 1000)).encode()
            headers: list[tuple[str, str | bytes | None]] = [("ingest_ms", ingest_ms)]
            if traceparent is not None:
                headers.append(("traceparent", traceparent))
            if len(reports) == 1:
                span.set_attribute("robot_id", reports[0].robot_id)
            outgoing: list[OutgoingReport] = [
                (r.robot_id.encode(), encode(r), headers) for r in reports
            ]
            await producer.send(outgoing)
            metrics.accepted.inc(len(reports))

    @post("/v1/reports", status_code=202, summary="Post one robot report")
    async def post_report(request: AnyRequest) -> Accepted:
        """Accept one report; 202 once Kafka has acknowledged it."""
        _require_json(request)
        body = await request.body()
        try:
            report = decode_report(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise schema_error(exc, "the report") from None
        await publish([report], "/v1/reports")
        return Accepted(1)

    @post("/v1/reports/batch", status_code=202, summary="Post a batch of robot reports")
    async def post_batch(request: AnyRequest) -> Accepted:
        """Accept a JSON array of reports, all or nothing; 202 once Kafka has all of them."""
        _require_json(request)
        body = await request.body()
        try:
            reports = decode_reports(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise schema_error(exc, "the batch") from None
        if not reports:
            raise ApiError(422, "empty_batch", "the batch holds no reports")
        if len(reports) > settings.max_batch_reports:
            raise ApiError(
                413,
                "batch_too_large",
                f"the batch holds {len(reports)} reports; at most "
                f"{settings.max_batch_reports} (FLEETPULSE_MAX_BATCH_REPORTS)",
            )
        await publish(reports, "/v1/reports/batch")
        return Accepted(len(reports))

    return [post_report, post_batch]
