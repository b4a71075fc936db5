"""Admin routes of the ingest server: operator commands, written to Kafka like reports.

    POST /v1/robots/{robot_id}/reset-order   admin scope; 202 {"accepted": 1}
    POST /v1/robots/{robot_id}/retire        admin scope; 202 {"accepted": 1}
    POST /v1/incidents/{incident_id}/ack     admin scope; 202 {"accepted": 1}
    GET  /v1/rules                           admin scope; the rules file in force
    PUT  /v1/rules                           admin scope; check and replace the rules file

A command is a control record (``fleetpulse.control``) on the reports topic, keyed by
the robot, so the dataflow meets it in order with the robot's reports. It is as
durable as a report: the same idempotent acks=all producer, 202 only once Kafka has
acknowledged it, 503 otherwise (nothing claimed; the client retries).

Every command leaves one audit line (logger ``fleetpulse.audit``): the action, the
robot, who asked (the token's fingerprint, never the token) and the client address,
with the outcome.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import anyio
import anyio.to_thread
import msgspec
from litestar import HttpMethod, post, route
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import PathParameter
from litestar.types import ControllerRouterHandler
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from api.auth import bearer_token, token_fingerprint
from api.errors import AnyRequest, ApiError, ErrorBody
from api.ingest import Accepted, error_docs, record_headers
from api.producer import ReportProducer
from api.query import RobotIdPath
from fleetpulse.alert_rules import Rule, RulesError, load_rules, write_atomically
from fleetpulse.control import (
    CONTROL_HEADER,
    INCIDENT_ID_PATTERN,
    Control,
    ack,
    encode_control,
    reset_order,
    retire,
)
from fleetpulse.errors import IngestError
from fleetpulse.settings import Settings
from state.reads import robot_of

__all__ = [
    "ACK_PATH",
    "RESET_ORDER_PATH",
    "RETIRE_PATH",
    "RULES_PATH",
    "RulesInForce",
    "admin_routes",
]

audit = logging.getLogger("fleetpulse.audit")

RESET_ORDER_PATH = "/v1/robots/{robot_id:str}/reset-order"
RETIRE_PATH = "/v1/robots/{robot_id:str}/retire"
ACK_PATH = "/v1/incidents/{incident_id:str}/ack"
RULES_PATH = "/v1/rules"

IncidentIdPath = Annotated[
    str,
    PathParameter(
        pattern=INCIDENT_ID_PATTERN,
        description="An incident id, `<robot>:<rule>:<boot>:<seq>`.",
        examples=[Example(value="amr-7:battery-critical:0:1234")],
    ),
]
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


class RulesInForce(msgspec.Struct, frozen=True, kw_only=True):
    """The rules file's rules, and which version they are."""

    path: str
    digest: str  # a short sha256 of the rules (also in the dataflow's log when applied)
    rules: list[Rule]


def _audit(action: str, robot_id: str, by: str, client: str, outcome: str) -> None:
    fields = {"action": action, "robot_id": robot_id, "by": by, "client": client}
    audit.info(
        "%s %s by %s from %s: %s",
        action,
        robot_id,
        by,
        client or "-",
        outcome,
        extra={"fields": {**fields, "outcome": outcome}},
    )


def admin_routes(
    settings: Settings, producer: ReportProducer, tracer: trace.Tracer
) -> list[ControllerRouterHandler]:
    """The admin POST routes, bound to the ingest server's producer."""

    async def send(request: AnyRequest, control: Control) -> Accepted:
        """Write ``control`` to the robot's partition; 202 once Kafka has it, audited."""
        robot_id, by = control.robot_id, control.by
        client = request.client.host if request.client else ""
        with tracer.start_as_current_span(
            f"produce {settings.topic_reports}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": settings.topic_reports,
                "robot_id": robot_id,
                "fleetpulse.control": control.control,
            },
        ) as span:
            headers = record_headers(span, (CONTROL_HEADER, control.control.encode()))
            try:
                await producer.send([(robot_id.encode(), encode_control(control), headers)])
            except IngestError as exc:
                _audit(control.control, robot_id, by, client, f"failed: {exc}")
                raise
        _audit(control.control, robot_id, by, client, "accepted")
        return Accepted(1)

    def who(request: AnyRequest) -> str:
        # The guard let the request through, so the header holds a known admin token.
        return token_fingerprint(bearer_token(request.headers.get("authorization")) or "")

    errors = error_docs(
        400, 401, 403, 422, 503, s422="`robot_id` is not a robot id; `fields` names it"
    )
    durable = ResponseSpec(Accepted, description="The command is durable in Kafka")
    accepted = {
        202: durable,
        **errors,
    }

    @post(
        RESET_ORDER_PATH,
        status_code=202,
        summary="Reset a robot's report ordering",
        description="For a robot whose `(boot, seq)` went backwards (reflashed, counter "
        "reset) and whose reports are all `stale`: the dataflow forgets its newest "
        "`(boot, seq)`, so its next report applies. Needs an `admin` token. 202 once the "
        "command is durable in Kafka, in order with the robot's reports.",
        responses=accepted,
    )
    async def post_reset_order(request: AnyRequest, robot_id: RobotIdPath) -> Accepted:
        """Write a ``reset_order`` control record for the robot; 202 once Kafka has it."""
        return await send(request, reset_order(robot_id, who(request)))

    @post(
        RETIRE_PATH,
        status_code=202,
        summary="Retire a robot",
        description="Forget a robot (decommissioned, renamed, or an id minted by mistake): "
        "the dataflow drops its state, and its live state, history, windows, alerts, index "
        "entries and summary counts leave Redis together; SSE clients get `event: retired`. "
        "Reports of it from before the command cannot bring it back (not even when the "
        "dataflow replays or re-publishes); a report after it starts a new robot. Needs an "
        "`admin` token. 202 once the command is durable in Kafka, in order with the "
        "robot's reports; Redis follows when the dataflow reaches it.",
        responses=accepted,
    )
    async def post_retire(request: AnyRequest, robot_id: RobotIdPath) -> Accepted:
        """Write a ``retire`` control record for the robot; 202 once Kafka has it."""
        return await send(request, retire(robot_id, who(request)))

    @post(
        ACK_PATH,
        status_code=202,
        summary="Acknowledge an incident",
        description="An operator has seen the open incident: a control record in its "
        "robot's partition; the dataflow stamps the incident `acknowledged_at` and "
        "`acknowledged_by` (this token's fingerprint) and writes its new version (Redis, "
        "the incidents topic, `event: incident`). An incident that is closed, unknown or "
        "acknowledged already is left as it is. Needs an `admin` token.",
        responses={
            202: durable,
            **error_docs(400, 401, 403, 422, 503, s422="`incident_id` is not an incident id"),
        },
    )
    async def post_ack(request: AnyRequest, incident_id: IncidentIdPath) -> Accepted:
        """Write an ``ack`` control record to the incident's robot; 202 once Kafka has it."""
        return await send(request, ack(robot_of(incident_id), incident_id, who(request)))

    rules_docs = {
        404: "FLEETPULSE_RULES_FILE is empty: this server has no rules file",
        503: "The rules file cannot be read or replaced (a read-only mount: edit its "
        "ConfigMap); `detail` says why",
    }

    def rules_file() -> Path:
        if not settings.rules_file:
            raise ApiError(
                404,
                "no_rules_file",
                "FLEETPULSE_RULES_FILE is empty: no rules file to read or replace; set it "
                "(the same path) for the ingest server and the dataflow",
            )
        return Path(settings.rules_file)

    # One handler for both methods: Litestar's OPTIONS answer for a path lists only the
    # methods of the handler registered first (Allow: GET, OPTIONS with two handlers).
    @route(
        RULES_PATH,
        http_method=[HttpMethod.GET, HttpMethod.PUT],
        summary="The alert rules: read them (GET) or replace them (PUT)",
        description="GET: the rules file (FLEETPULSE_RULES_FILE) as the dataflow reads it, "
        "and its digest. PUT: the body is a whole rules document, YAML (`application/yaml`) "
        "or JSON (`application/json`); it is checked first — 422 names the rule and the "
        "field of the first problem — then written in place of the file atomically; every "
        "dataflow process watching the file applies it within a second or so, without a "
        "restart (incidents of a removed rule close). Needs an `admin` token.",
        responses={
            **error_docs(
                400,
                401,
                403,
                413,
                422,
                s422="PUT: the rules are not valid; `detail` names the rule and field",
            ),
            404: ResponseSpec(ErrorBody, description=rules_docs[404], generate_examples=False),
            415: ResponseSpec(
                ErrorBody,
                description="PUT: Content-Type is not application/json or application/yaml",
                generate_examples=False,
            ),
            503: ResponseSpec(ErrorBody, description=rules_docs[503], generate_examples=False),
        },
        status_code=200,
    )
    async def rules(request: AnyRequest) -> RulesInForce:
        """The rules file, checked (GET); the new rules checked, then the file replaced (PUT)."""
        path = rules_file()
        if request.method == "GET":
            try:
                book = load_rules(await anyio.Path(path).read_bytes(), str(path))
            except OSError as exc:
                problem = f"cannot read {path}: {exc.strerror}"
                raise ApiError(503, "rules_unavailable", problem) from None
            except RulesError as exc:
                problem = f"the file in place is not valid: {exc}"
                raise ApiError(503, "rules_unavailable", problem) from None
            return RulesInForce(path=str(path), digest=book.digest, rules=book.rules)
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json" and media_type not in _YAML_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json or application/yaml, not "
                f"{media_type or 'missing'}",
            )
        body = await request.body()
        by = who(request)
        client = request.client.host if request.client else ""
        try:
            book = load_rules(body, "the new rules")
        except RulesError as exc:
            _audit("put_rules", "-", by, client, f"refused: {exc}")
            raise ApiError(422, "invalid_rules", str(exc)) from None
        try:
            await anyio.to_thread.run_sync(write_atomically, path, body)
        except OSError as exc:
            _audit("put_rules", "-", by, client, f"failed: {exc.strerror}")
            raise ApiError(
                503,
                "rules_unavailable",
                f"cannot replace {path}: {exc.strerror} (a read-only mount? edit its ConfigMap)",
            ) from None
        _audit("put_rules", "-", by, client, f"accepted: {len(book.rules)} rule(s), {book.digest}")
        return RulesInForce(path=str(path), digest=book.digest, rules=book.rules)

    return [post_reset_order, post_retire, post_ack, rules]
