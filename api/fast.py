"""The single-report post without Litestar's request machinery, for the accepted case.

A fleet posting one report per robot per second makes ``POST /v1/reports`` the hottest
route by far, and on it Litestar's routing, connection objects, signature parsing and
exception middleware cost more than the report's validation and produce together
(bench/README.md: ingest). :class:`SingleReport` answers that route straight from the
ASGI scope when everything about the request is in order: a token with the ingest
scope, ``Content-Type: application/json``, a body within FLEETPULSE_MAX_BODY_BYTES that
is a valid report inside the time bounds. It still runs under the same
:class:`~observability.http.ObservabilityMiddleware` (server span, request metrics) and
the same :class:`~api.ingest.Publisher` (produce span, acks=all, 202 only once Kafka
confirmed); a producer refusal is answered with the error body the exception handlers
would give.

Anything else — a missing token, a wrong media type, a body too large, bad JSON, a
schema violation, a ``ts`` out of bounds — is handed to Litestar with the body read so
far replayed, so every error answer (and its OpenAPI description) stays Litestar's,
made by the same code as before. Those requests pay twice for the checks; they are the
rare ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from api.auth import TokenStore, bearer_token
from api.errors import ApiError, domain_error
from api.ingest import Accepted, Publisher, check_single
from api.limits import Limits
from api.signing import Signatures, key_id
from fleetpulse.errors import FleetpulseError
from fleetpulse.settings import Settings
from observability.http import ObservabilityMiddleware
from observability.metrics import ApiMetrics

__all__ = ["ROUTE", "SingleReport"]

ROUTE = "/v1/reports"
_ACCEPTED = msgspec.json.encode(Accepted(1))
_JSON = b"application/json"

# Plain ASGI shapes: Litestar's TypedDict unions say nothing more here.
Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]


def _json_start(status: int, body: bytes, extra: dict[str, str] | None = None) -> Message:
    headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": headers}


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """``receive`` with the ``body`` already read from it given back first."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": more}

    return replay


class SingleReport:
    """``POST /v1/reports`` answered from the ASGI scope; see the module's docstring."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenStore,
        publish: Publisher,
        observe: ObservabilityMiddleware,
        metrics: ApiMetrics,
        live: Callable[[], Settings] | None = None,
        signatures: Signatures | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.settings = settings
        # A token that must sign goes the routes' way, where the body's signature is checked.
        self.signatures = signatures
        self.limits = limits
        self.live = live or (lambda: settings)  # the time bounds' settings (hot-reloaded)
        self.tokens = tokens
        self.publish = publish
        self.observe = observe
        self.metrics = metrics
        self.max_body = settings.max_body_bytes

    def wants(self, scope: Scope) -> bool:
        """Whether ``scope`` is a request for this route."""
        path: str | None = scope.get("path")  # a lifespan scope has none
        return path == ROUTE and scope["type"] == "http" and scope["method"] == "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send, litestar: ASGIApp) -> None:
        authorization = media_type = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                media_type = value.split(b";", 1)[0].strip().lower()
            elif name == b"content-length":
                length = value
        if (
            media_type != _JSON
            or (length is not None and (not length.isdigit() or int(length) > self.max_body))
            or self.tokens.check(authorization, "ingest") is not None
            or (self.signatures and self.signatures.secrets_for(bearer_token(authorization)))
        ):
            await litestar(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer, nothing accepted
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                break
        if more or len(body) > self.max_body:
            await litestar(scope, _replay(body, more, receive), send)
            return
        try:
            report = check_single(body, self.live())
        except ApiError:
            await litestar(scope, _replay(body, False, receive), send)
            return
        token = bearer_token(authorization) or ""
        if self.limits and self.limits.admit(key_id(token), (report.robot_id,)) is not None:
            # Over a limit: the route answers the 429 (nothing was taken from the buckets).
            await litestar(scope, _replay(body, False, receive), send)
            return

        async def accept(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await self.publish([report], ROUTE)
            except FleetpulseError as exc:
                refused = domain_error(exc)
                self.metrics.rejected.labels(refused.body.error).inc()
                answer = msgspec.json.encode(refused.body)
                await send(_json_start(refused.status, answer, refused.headers))
                await send({"type": "http.response.body", "body": answer})
                return
            await send(_json_start(202, _ACCEPTED))
            await send({"type": "http.response.body", "body": _ACCEPTED})

        scope["path_template"] = ROUTE  # what Litestar's router would have set
        await self.observe.handle(scope, receive, send, accept)  # type: ignore[arg-type]
