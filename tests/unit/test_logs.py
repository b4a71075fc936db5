"""JSON log lines carry the active span's trace and span ids."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from observability.logs import JsonFormatter


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("fleetpulse.test", logging.WARNING, __file__, 1, msg, (), None)


def test_a_line_inside_a_span_carries_its_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    formatter = JsonFormatter("fleetpulse-test")
    with tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(_record("inside %s")))
        ctx = span.get_span_context()
    assert line["msg"] == "inside %s"
    assert line["level"] == "WARNING"
    assert line["service"] == "fleetpulse-test"
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")


def test_a_line_outside_any_span_has_empty_ids() -> None:
    line = json.loads(JsonFormatter("svc").format(_record("outside")))
    assert (line["trace_id"], line["span_id"]) == ("", "")
    assert line["ts"].endswith("Z")
