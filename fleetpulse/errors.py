"""The project's exceptions, one root and a few specific ones.

    FleetpulseError
    ├── ConfigError          a setting is missing, unknown or out of range
    ├── StackError           a local-stack service could not be provisioned or started
    ├── InvalidQuery         a query parameter is out of range or malformed (API: 422)
    ├── TracesUnavailable    the Jaeger query API did not answer (API: 503)
    └── IngestError          a report could not be made durable
        ├── BrokerUnavailable    Kafka did not confirm in time, or the producer queue is full
        └── ReportRejected       Kafka refused the report for good (too large, bad topic, ...)

Messages say what was wrong and what to do about it; the API maps these to HTTP
answers in one place (``api.errors``).
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "FleetpulseError",
    "IngestError",
    "InvalidQuery",
    "ReportRejected",
    "StackError",
    "TracesUnavailable",
]


class FleetpulseError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(FleetpulseError):
    """A ``FLEETPULSE_*`` setting is unknown or has a value that is not allowed."""


class StackError(FleetpulseError):
    """A service of the local stack could not be provisioned, started or reached."""


class InvalidQuery(FleetpulseError, ValueError):  # noqa: N818
    """A query parameter (cursor, limit, stream id, time) is malformed or out of range."""

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(f"{parameter}: {detail}")
        self.parameter = parameter
        self.detail = detail


class TracesUnavailable(FleetpulseError):  # noqa: N818
    """The Jaeger query API could not be reached or answered with an error."""


class IngestError(FleetpulseError):
    """A report could not be made durable in Kafka."""


class BrokerUnavailable(IngestError):  # noqa: N818 - reads as a condition, like httpx's errors
    """Kafka did not confirm delivery within the bound, or the producer queue is full.

    The report was not accepted; the client should retry later.
    """


class ReportRejected(IngestError):  # noqa: N818
    """Kafka refused the report permanently; retrying the same bytes will not help."""
