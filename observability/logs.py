"""JSON logs, one object a line, carrying the current trace_id and span_id.

``setup_logging(settings, service)`` is called once at each entry point. A log line
written inside a span can be found in Jaeger by its trace id, and the other way round.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec
from opentelemetry import trace

from fleetpulse.settings import Settings

__all__ = ["JsonFormatter", "set_log_level", "setup_logging"]

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON with the active span's ids (empty outside a span)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ctx = trace.get_current_span().get_span_context()
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            "trace_id": format(ctx.trace_id, "032x") if ctx.is_valid else "",
            "span_id": format(ctx.span_id, "016x") if ctx.is_valid else "",
        }
        # Structured fields a caller passes as `extra={"fields": {...}}` (e.g. the audit
        # log's action, robot_id, by); they never replace the keys above.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update({k: v for k, v in fields.items() if k not in doc})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(doc).decode()


def setup_logging(settings: Settings, service: str) -> None:
    """Send our loggers' records to stderr as JSON at ``FLEETPULSE_LOG_LEVEL``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger("fleetpulse")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    root.propagate = False


def set_log_level(level: str) -> None:
    """Change the level of our loggers while running (a hot reload of the log level)."""
    logging.getLogger("fleetpulse").setLevel(level)
