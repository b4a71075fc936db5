"""OpenTelemetry setup, once per process, and trace-context carry over Kafka headers.

Traces go to Jaeger over OTLP/gRPC (Jaeger ingests OTLP natively; the old
Jaeger-specific exporter is retired). Sampling is parent-based with a ratio from
settings, so a trace started at ingest is kept or dropped as a whole downstream.
"""

from __future__ import annotations

import atexit
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

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
# By service and what shapes the provider (sample ratio, endpoint): an app made with
# other tracing settings (tests run several in one process) gets a provider of its own.
_providers: dict[tuple[str, float, str], TracerProvider] = {}
_propagator = TraceContextTextMapPropagator()


def setup_tracing(settings: Settings, service_name: str) -> TracerProvider:
    """Install (once per process, service and tracing settings) a tracer provider
    exporting to OTLP; the first one made is also the global provider.

    Spans are flushed when the process exits normally; call ``provider.shutdown()``
    earlier for a clean flush on a controlled stop.
    """
    key = (service_name, settings.trace_sample_ratio, settings.otlp_grpc_endpoint)
    with _lock:
        provider = _providers.get(key)
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
        _providers[key] = provider
        atexit.register(provider.shutdown)
        return provider


def traceparent_header(span: trace.Span) -> bytes | None:
    """The W3C ``traceparent`` of ``span`` (its sampled flag included), or None when its
    context is not valid."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    # What TraceContextTextMapPropagator.inject writes, without a carrier and a context.
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)


def context_from_traceparent(traceparent: str | None) -> Context | None:
    """A parent context from a ``traceparent`` string (None when absent or malformed)."""
    if not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


class TracedCalls:
    """A proxy that makes each public method call on ``target`` a CLIENT span.

    Used around the query API's Redis readers: every read is a span named ``redis
    <operation>``, a child of the request's server span; the operation is the method's
    name, or what ``names`` maps it to (``get_raw`` -> ``get``: the span names the read,
    not the form its answer takes). Coroutine methods are wrapped by coroutines.

    Made once per reader: each method's wrapper is built on first use and kept. A call
    under a span that is not recorded (an unsampled request) runs without a span of its
    own, since parent-based sampling would drop it anyway; its name and attributes are
    made once, and copied only into spans that are recorded.
    """

    def __init__(
        self,
        target: object,
        tracer: trace.Tracer,
        system: str = "redis",
        names: Mapping[str, str] | None = None,
    ) -> None:
        self._target = target
        self._tracer = tracer
        self._system = system
        self._names = dict(names or {})

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._target, name)
        if name.startswith("_") or not callable(attr):
            return attr
        wrapped = self._wrap(name, attr)
        setattr(self, name, wrapped)  # found as a plain attribute from now on
        return wrapped

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        tracer, system = self._tracer, self._system
        operation = self._names.get(name, name)
        span_name = f"{system} {operation}"
        attributes = {"db.system": system, "db.operation": operation}
        client = trace.SpanKind.CLIENT

        if inspect.iscoroutinefunction(method):

            async def acall(*args: Any, **kwargs: Any) -> Any:
                if not _worth_a_span():
                    return await method(*args, **kwargs)
                with tracer.start_as_current_span(span_name, kind=client, attributes=attributes):
                    return await method(*args, **kwargs)

            return acall

        def call(*args: Any, **kwargs: Any) -> Any:
            if not _worth_a_span():
                return method(*args, **kwargs)
            with tracer.start_as_current_span(span_name, kind=client, attributes=attributes):
                return method(*args, **kwargs)

        return call


def _worth_a_span() -> bool:
    """Whether a child span of the current one may be recorded: the current span is, or
    there is none (a root span, which the sampler decides on)."""
    parent = trace.get_current_span()
    return parent.is_recording() or not parent.get_span_context().is_valid
