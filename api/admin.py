"""Admin routes of the ingest server: operator commands, written to Kafka like reports.

    POST /v1/robots/{robot_id}/reset-order   admin scope; 202 {"accepted": 1}
    POST /v1/robots/{robot_id}/retire        admin scope; 202 {"accepted": 1}

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

from litestar import post
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ControllerRouterHandler
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from api.auth import bearer_token, token_fingerprint
from api.errors import AnyRequest
from api.ingest import Accepted, error_docs, record_headers
from api.producer import ReportProducer
from api.query import RobotIdPath
from fleetpulse.control import CONTROL_HEADER, Control, encode_control, reset_order, retire
from fleetpulse.errors import IngestError
from fleetpulse.settings import Settings

__all__ = ["RESET_ORDER_PATH", "RETIRE_PATH", "admin_routes"]

audit = logging.getLogger("fleetpulse.audit")

RESET_ORDER_PATH = "/v1/robots/{robot_id:str}/reset-order"
RETIRE_PATH = "/v1/robots/{robot_id:str}/retire"


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

    @post(
        RESET_ORDER_PATH,
        status_code=202,
        summary="Reset a robot's report ordering",
        description="For a robot whose `(boot, seq)` went backwards (reflashed, counter "
        "reset) and whose reports are all `stale`: the dataflow forgets its newest "
        "`(boot, seq)`, so its next report applies. Needs an `admin` token. 202 once the "
        "command is durable in Kafka, in order with the robot's reports.",
        responses={
            202: ResponseSpec(Accepted, description="The command is durable in Kafka"),
            **errors,
        },
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
        responses={
            202: ResponseSpec(Accepted, description="The command is durable in Kafka"),
            **errors,
        },
    )
    async def post_retire(request: AnyRequest, robot_id: RobotIdPath) -> Accepted:
        """Write a ``retire`` control record for the robot; 202 once Kafka has it."""
        return await send(request, retire(robot_id, who(request)))

    return [post_reset_order, post_retire]
