"""OpenTelemetry setup, once per process, and trace-context carry over Kafka headers.

Traces go to Jaeger over OTLP/gRPC (Jaeger ingests OTLP natively; the old
Jaeger-specific exporter is retired). Sampling is parent-based with a ratio from
settings, so a trace started at ingest is kept or dropped as a whole downstream.
"""

from __future__ import annotations

import atexit
import threading

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleetpulse.settings import Settings

__all__ = [
    "TracedCalls",
    "context_from_traceparent",
    "setup_tracing",
    "traceparent_header",
]

_lock = threading.Lock()
_providers: dict[str, TracerProvider] = {}
_propagator = TraceContextTextMapPropagator()


def setup_tracing(settings: Settings, service_name: str) -> TracerProvider:
    """Install (once per process and service) a tracer provider exporting to OTLP.

    Spans are flushed when the process exits normally; call ``provider.shutdown()``
    earlier for a clean flush on a controlled stop.
    """
    with _lock:
        provider = _providers.get(service_name)
        if provider is not None:
            return provider
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=settings.otlp_grpc_endpoint, insecure=True)
        provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=500, max_export_batch_size=512)
        )
        if not _providers:
            trace.set_tracer_provider(provider)
        _providers[service_name] = provider
        atexit.register(provider.shutdown)
        return provider


def traceparent_header(span: trace.Span) -> bytes | None:
    """The W3C ``traceparent`` of ``span``, or None when it is not a recorded/valid span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    value = carrier.get("traceparent")
    return value.encode() if value else None


def context_from_traceparent(traceparent: str | None) -> Context | None:
    """A parent context from a ``traceparent`` string (None when absent or malformed)."""
    if not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


class TracedCalls:
    """A proxy that makes each public method call on ``target`` a CLIENT span.

    Used around the query API's Redis reader: every read is a span named
    ``redis <method>``, a child of the request's server span.
    """

    def __init__(self, target: object, tracer: trace.Tracer, system: str = "redis") -> None:
        self._target = target
        self._tracer = tracer
        self._system = system

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._target, name)
        if name.startswith("_") or not callable(attr):
            return attr
        tracer, system = self._tracer, self._system

        def call(*args: object, **kwargs: object) -> object:
            with tracer.start_as_current_span(
                f"{system} {name}",
                kind=trace.SpanKind.CLIENT,
                attributes={"db.system": system, "db.operation": name},
            ):
                return attr(*args, **kwargs)

        return call
