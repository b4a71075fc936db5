"""Every error answer is ``{"error", "detail", "fields"}``; domain errors map here, in one place."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from fleetpulse.errors import (
    BrokerUnavailable,
    FleetpulseError,
    ReportRejected,
    TracesUnavailable,
)

__all__ = [
    "AnyRequest",
    "ApiError",
    "ErrorBody",
    "domain_error",
    "error_response",
    "exception_handlers",
    "schema_error",
    "validation_error",
]

log = logging.getLogger("fleetpulse.api")

AnyRequest = Request[Any, Any, Any]


class ErrorBody(msgspec.Struct, frozen=True):
    """The body of every error answer."""

    error: str  # a stable machine-readable code
    detail: str  # what was wrong and what to do, for people
    fields: list[str] = msgspec.field(default_factory=list)  # offending fields, if any


class ApiError(Exception):
    """An error answer raised from a handler or guard."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        fields: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body = ErrorBody(error, detail, list(fields))
        self.headers = dict(headers or {})


def error_response(exc: ApiError, request: AnyRequest | None = None) -> Response[ErrorBody]:
    """The answer for ``exc``; counted by its code in the app's metrics, if it has any."""
    metrics = getattr(request.app.state, "metrics", None) if request is not None else None
    if metrics is not None:
        metrics.rejected.labels(exc.body.error).inc()
    return Response(exc.body, status_code=exc.status, headers=exc.headers)


_PATH = re.compile(r" - at `\$(.*)`$")


def schema_error(exc: msgspec.ValidationError | msgspec.DecodeError, what: str) -> ApiError:
    """A 422 naming the offending field from a msgspec error (``$[3].pose.x`` -> ``[3].pose.x``)."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return ApiError(422, "invalid_json", f"{what} is not valid JSON: {text}")
    match = _PATH.search(text)
    field = match.group(1).lstrip(".") if match else ""
    reason = text[: match.start()] if match else text
    # "Object contains unknown field `x`" / "missing required field `x`": name the field itself.
    named = re.search(r"field `([^`]*)`", reason)
    if named is not None:
        field = f"{field}.{named.group(1)}" if field else named.group(1)
    if not field:
        return ApiError(422, "invalid_report", f"{what}: {reason}")
    index = re.match(r"\[(\d+)\]", field)
    where = f"item {index.group(1)} of the batch" if index else what
    return ApiError(422, "invalid_report", f"{where}: {reason} (at `{field}`)", [field])


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def validation_error(exc: ValidationException) -> ApiError:
    """A 422 naming each parameter Litestar refused and why (its own detail is only
    "Validation failed for POST ...")."""
    problems = [e for e in (exc.extra or []) if isinstance(e, Mapping)]
    fields = [str(e.get("key", "")) for e in problems]
    reasons = "; ".join(f"{e.get('key', '?')}: {e.get('message', 'invalid')}" for e in problems)
    return ApiError(422, "invalid_parameter", reasons or str(exc.detail), fields)


def _on_api_error(request: AnyRequest, exc: ApiError) -> Response[ErrorBody]:
    return error_response(exc, request)


def _on_http(request: AnyRequest, exc: HTTPException) -> Response[ErrorBody]:
    if isinstance(exc, ValidationException):
        return error_response(validation_error(exc), request)
    status = exc.status_code
    detail = str(exc.detail)
    if status == 413:
        detail = "request body is larger than FLEETPULSE_MAX_BODY_BYTES allows"
    return error_response(
        ApiError(status, _HTTP_CODES.get(status, "error"), detail, headers=exc.headers), request
    )


def domain_error(exc: FleetpulseError) -> ApiError:
    """The answer for a producer's refusal (503 with Retry-After, or 422 rejected)."""
    if isinstance(exc, BrokerUnavailable):
        return ApiError(503, "unavailable", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, ReportRejected):
        return ApiError(422, "rejected", str(exc))
    if isinstance(exc, TracesUnavailable):
        return ApiError(503, "unavailable", str(exc), headers={"Retry-After": "5"})
    log.exception("unexpected domain error")
    return ApiError(500, "internal_error", "internal error")


def _on_domain(request: AnyRequest, exc: FleetpulseError) -> Response[ErrorBody]:
    return error_response(domain_error(exc), request)


def _on_crash(request: AnyRequest, exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error", exc_info=exc)
    crash = ApiError(500, "internal_error", "internal error; see the server log")
    return error_response(crash, request)


exception_handlers = {
    ApiError: _on_api_error,
    HTTPException: _on_http,
    FleetpulseError: _on_domain,
    Exception: _on_crash,
}
