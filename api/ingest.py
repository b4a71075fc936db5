"""Ingest routes (the webhook server): validate reports, make them durable, answer 202.

A 202 means every report of the request is in Kafka (acks=all, idempotent producer).
A batch is all or nothing at validation: one invalid item rejects the batch and the
answer names its index. If Kafka cannot confirm in time the answer is 503 with
Retry-After and nothing is claimed; a retried request may then write a report twice,
which the dataflow drops by ``(boot, seq)``.

A report's ``ts`` must lie within ``FLEETPULSE_MAX_AGE_S`` behind and
``FLEETPULSE_MAX_FUTURE_S`` ahead of the server's clock (``time_bounds_problem``, the
same rule the dataflow applies against the Kafka append time): a robot clock at year
9999 or year 1 would otherwise open windows and move watermarks no real report reaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated

import msgspec
from litestar import post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body
from litestar.response.base import ASGIResponse
from litestar.types import ControllerRouterHandler
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from api.auth import bearer_token
from api.errors import AnyRequest, ApiError, ErrorBody, schema_error
from api.limits import Limits
from api.producer import ReportProducer
from api.signing import SIGNATURE_HEADER, Signatures, key_id
from fleetpulse.schema import (
    RobotReport,
    decode_report,
    decode_reports,
    encode,
    time_bounds_problem,
)
from fleetpulse.settings import Settings
from observability.metrics import ApiMetrics
from observability.tracing import traceparent_header

__all__ = [
    "Accepted",
    "Headers",
    "Publisher",
    "check_limits",
    "check_signature",
    "check_single",
    "error_docs",
    "ingest_routes",
    "limits_from",
    "record_headers",
]

Headers = list[tuple[str, str | bytes | None]]


class Accepted(msgspec.Struct, frozen=True):
    """The answer to an accepted post: how many reports are now durable in Kafka."""

    accepted: int


# Every accepted single post gets the same answer, so it is rendered once and shared (an
# ASGIResponse only reads its fields when sent). Litestar would otherwise make a Response,
# encode it and build its headers for each request: ~15 % of a single post's handling.
# The OpenAPI document still says `Accepted`, from the route's 202 ResponseSpec.
_ACCEPTED_ONE = ASGIResponse(body=msgspec.json.encode(Accepted(1)), status_code=202)


def record_headers(span: trace.Span, *extra: tuple[str, bytes]) -> Headers:
    """The headers of every record ingest writes: ``ingest_ms``, ``traceparent`` (when the
    span is recorded), then ``extra``."""
    headers: Headers = [("ingest_ms", str(int(time.time() * 1000)).encode())]
    traceparent = traceparent_header(span)
    if traceparent is not None:
        headers.append(("traceparent", traceparent))
    headers.extend(extra)
    return headers


_ERROR_DOCS = {
    400: "Malformed request",
    401: "Missing or unknown bearer token, or (a token that must sign) a missing, stale or "
    "wrong X-Fleetpulse-Signature",
    403: "The token's scope does not cover this route",
    413: "Body over FLEETPULSE_MAX_BODY_BYTES, or a batch over FLEETPULSE_MAX_BATCH_REPORTS",
    415: "Content-Type is not application/json",
    422: "Bad JSON or a schema violation; `fields` names the field (`[i].field` in a batch)",
    429: "Over a rate limit (FLEETPULSE_INGEST_TOKEN_RATE or _ROBOT_RATE); nothing was "
    "accepted, retry after Retry-After",
    503: "Kafka did not confirm in time, the producer queue is full or the producer is being "
    "rebuilt; nothing was accepted, retry after Retry-After",
}


def error_docs(*statuses: int, **described: str) -> dict[int, ResponseSpec]:
    """OpenAPI entries of the error answers ``statuses`` (ErrorBody), for the write routes;
    ``described`` replaces a description (``s422="..."``)."""
    return {
        s: ResponseSpec(
            data_container=ErrorBody,
            description=described.get(f"s{s}", _ERROR_DOCS[s]),
            generate_examples=False,
        )
        for s in statuses
    }


def _check_times(reports: Sequence[RobotReport], settings: Settings, batch: bool) -> None:
    """422 naming ``ts`` (``[i].ts``) for the first report outside the bounds of our clock."""
    now = time.time()
    for i, report in enumerate(reports):
        problem = time_bounds_problem(report.ts, now, settings.max_future_s, settings.max_age_s)
        if problem is not None:
            field = f"[{i}].ts" if batch else "ts"
            where = f"item {i} of the batch" if batch else "the report"
            raise ApiError(
                422, "invalid_report", f"{where}: {problem.detail} (at `{field}`)", [field]
            )


def _require_json(request: AnyRequest) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {media_type or 'missing'}",
        )


def check_single(body: bytes, settings: Settings) -> RobotReport:
    """The report of a single post's ``body``, or the 422 ApiError for it."""
    try:
        report = decode_report(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise schema_error(exc, "the report") from None
    _check_times([report], settings, batch=False)
    return report


class Publisher:
    """Make reports durable under a produce span (a child of the request's server span)
    and count them accepted; raises BrokerUnavailable / ReportRejected as the producer
    does."""

    def __init__(
        self,
        settings: Settings,
        producer: ReportProducer,
        tracer: trace.Tracer,
        metrics: ApiMetrics,
    ) -> None:
        self.producer = producer
        self.tracer = tracer
        self.metrics = metrics
        self.topic = settings.topic_reports
        self.span_name = f"produce {settings.topic_reports}"

    async def __call__(self, reports: Sequence[RobotReport], route: str) -> None:
        server = trace.get_current_span()
        if server.get_span_context().is_valid and not server.is_recording():
            # An unsampled request (the sampler is parent-based, so its produce span would
            # be unsampled too): no span; the records carry the request's traceparent with
            # the unsampled flag, so the dataflow makes no span for them either.
            await self._send(reports, record_headers(server))
        else:
            with self.tracer.start_as_current_span(
                self.span_name,
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": self.topic,
                    "messaging.batch.message_count": len(reports),
                    "http.route": route,
                },
            ) as span:
                if len(reports) == 1:
                    span.set_attribute("robot_id", reports[0].robot_id)
                await self._send(reports, record_headers(span))
        self.metrics.accepted.inc(len(reports))

    async def _send(self, reports: Sequence[RobotReport], headers: Headers) -> None:
        await self.producer.send([(r.robot_id.encode(), encode(r), headers) for r in reports])


def check_signature(signatures: Signatures, request: AnyRequest, body: bytes) -> None:
    """401 naming what is wrong when the request's token must sign and the body's
    signature is missing, stale or wrong (:mod:`api.signing`)."""
    if not signatures:
        return
    token = bearer_token(request.headers.get("authorization"))
    problem = signatures.problem(token, request.headers.get(SIGNATURE_HEADER), body)
    if problem is not None:
        raise ApiError(
            401, "bad_signature", problem, headers={"WWW-Authenticate": 'Bearer realm="fleetpulse"'}
        )


def limits_from(settings: Settings) -> Limits:
    """The ingest rate limits of one server process (the rates shared among its workers)."""
    workers = settings.api_workers
    return Limits(
        settings.ingest_token_rate / workers,
        settings.ingest_token_burst,
        settings.ingest_robot_rate / workers,
        settings.ingest_robot_burst,
    )


def check_limits(
    limits: Limits, metrics: ApiMetrics, authorization: str | None, reports: Sequence[RobotReport]
) -> None:
    """Take the reports from the token's and robots' buckets, or 429 naming the limit."""
    if not limits:
        return
    token = bearer_token(authorization) or ""
    refused = limits.admit(key_id(token), (r.robot_id for r in reports))
    if refused is not None:
        metrics.limited.labels(refused.limit).inc(len(reports))
        raise ApiError(
            429, "rate_limited", refused.detail, headers={"Retry-After": str(refused.retry_after_s)}
        )


# The routes read the raw body (one decode, by msgspec, after the cheap checks), so
# Litestar sees no `data` parameter and would document no request body, which makes a
# post without one look schema-valid. A dependency that is declared but never requested
# puts the body's schema in the document without parsing anything.
def _one_report(data: RobotReport) -> None:
    """Documents ``POST /v1/reports``'s body (never called)."""


def _report_batch(max_reports: int) -> Callable[..., None]:
    """Documents ``POST /v1/reports/batch``'s body: 1 to ``max_reports`` reports."""

    def documents(data: list[RobotReport]) -> None:
        """Never called."""

    batch = Annotated[
        list[RobotReport], Body(min_items=1, max_items=max_reports, media_type="application/json")
    ]
    documents.__annotations__ = {"data": batch, "return": None}
    return documents


def _body_doc(documents: Callable[..., None]) -> dict[str, Provide]:
    return {"_body_doc": Provide(documents, sync_to_thread=False)}


def ingest_routes(
    settings: Settings,
    publish: Publisher,
    live: Callable[[], Settings] | None = None,
    signatures: Signatures | None = None,
    limits: Limits | None = None,
) -> list[ControllerRouterHandler]:
    """The POST routes, bound to one publisher. ``live()`` gives the settings of each
    request's time bounds (hot-reloaded; default: ``settings``); ``signatures``: the
    tokens that must sign their posts; ``limits``: the rate limits (none by default)."""
    current = live or (lambda: settings)
    signed = signatures or Signatures({}, settings.webhook_tolerance_s)
    limited = limits or Limits(0, 1, 0, 1)
    metrics = publish.metrics
    bounds = (
        f"A report's `ts` must lie within FLEETPULSE_MAX_AGE_S ({settings.max_age_s:g} s) "
        f"behind and FLEETPULSE_MAX_FUTURE_S ({settings.max_future_s:g} s) ahead of the "
        "server's clock (values at start; a config reload may change them); outside that "
        "the answer is 422 naming `ts` and stating the range."
    )
    responses = {
        202: ResponseSpec(Accepted, description="Durable in Kafka (acks=all)"),
        **error_docs(401, 403, 413, 415, 422, 429, 503),
    }

    @post(
        "/v1/reports",
        status_code=202,
        summary="Post one robot report",
        description="Accept one report (a `RobotReport` as JSON); 202 once Kafka has "
        f"acknowledged it. {bounds}",
        responses=responses,
        dependencies=_body_doc(_one_report),
    )
    async def post_report(request: AnyRequest) -> ASGIResponse:
        """Accept one report; 202 once Kafka has acknowledged it."""
        _require_json(request)
        body = await request.body()
        check_signature(signed, request, body)
        report = check_single(body, current())
        check_limits(limited, metrics, request.headers.get("authorization"), [report])
        await publish([report], "/v1/reports")
        return _ACCEPTED_ONE

    @post(
        "/v1/reports/batch",
        status_code=202,
        summary="Post a batch of robot reports",
        description=f"Accept a JSON array of at most FLEETPULSE_MAX_BATCH_REPORTS "
        f"({settings.max_batch_reports}) reports, all or nothing: one invalid item rejects "
        f"the batch and the answer names its index. {bounds}",
        responses=responses,
        dependencies=_body_doc(_report_batch(settings.max_batch_reports)),
    )
    async def post_batch(request: AnyRequest) -> Accepted:
        """Accept a JSON array of reports, all or nothing; 202 once Kafka has all of them."""
        _require_json(request)
        body = await request.body()
        check_signature(signed, request, body)
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
        _check_times(reports, current(), batch=True)
        check_limits(limited, metrics, request.headers.get("authorization"), reports)
        await publish(reports, "/v1/reports/batch")
        return Accepted(len(reports))

    return [post_report, post_batch]
