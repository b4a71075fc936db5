"""The dataflow's spans, made as finished records: cheap enough for every sampled report.

A report traced from ingest gets two spans here: ``process report`` (a child of
ingest's ``produce`` span, covering the robot's step) and ``redis write`` (its child,
covering the batch write that made the state visible). Made through the SDK's
tracer — a sampler call, a Span with its lock and attribute checks, context attach
and detach, a traceparent parsed and written again — a span cost ~65 µs of the
flow's one core per report; at a sample ratio of 1.0 that was most of the flow's time.
Here a span is recorded when it is already over: the parent's ids are read from the
``traceparent`` once, the span is a :class:`~opentelemetry.sdk.trace.ReadableSpan`
(about 5 µs) handed straight to a batch processor, whose exporter encodes and sends
it from its own thread. Unsampled reports cost nothing but a flag check.

Ids travel between the shard step and the sink as ``(trace_id, span_id)`` ints.
"""

from __future__ import annotations

import atexit
import random
import threading
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from fleetpulse.settings import Settings

__all__ = ["SERVICE", "FlowSpans", "SpanIds", "flow_spans", "sampled_parent"]

SERVICE = "fleetpulse-dataflow"
SpanIds = tuple[int, int]  # (trace id, span id)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_HEX = frozenset("0123456789abcdef")


def sampled_parent(traceparent: str) -> SpanIds | None:
    """The (trace id, span id) of a W3C ``traceparent`` whose flags say sampled, else None.

    ``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``; ids of all zeros are invalid.
    """
    if len(traceparent) != 55 or traceparent[2] != "-" or traceparent[35] != "-":
        return None
    try:
        if not int(traceparent[53:55], 16) & 1:
            return None
        trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    except ValueError:
        return None
    if not (trace_id and span_id and _HEX.issuperset(traceparent[3:52].replace("-", ""))):
        return None
    return trace_id, span_id


class FlowSpans:
    """Records finished spans of the dataflow service and exports them in batches."""

    def __init__(self, processor: BatchSpanProcessor, resource: Resource) -> None:
        self._processor = processor
        self._resource = resource
        self._scope = InstrumentationScope("fleetpulse.flow")
        self._ids = random.Random()  # span ids need to be unique, not secret

    def record(
        self,
        name: str,
        parent: SpanIds,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, str | int | bool],
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> SpanIds:
        """Export one finished span, a child of ``parent``; returns its own ids."""
        trace_id = parent[0]
        span_id = self._ids.getrandbits(64) or 1
        span = ReadableSpan(
            name,
            SpanContext(trace_id, span_id, False, _SAMPLED),
            SpanContext(trace_id, parent[1], True, _SAMPLED),
            self._resource,
            attributes,
            kind=kind,
            instrumentation_scope=self._scope,
            start_time=start_ns,
            end_time=end_ns,
        )
        self._processor.on_end(span)
        return trace_id, span_id

    def shutdown(self) -> None:
        """Export what is queued, then stop."""
        self._processor.shutdown()  # type: ignore[no-untyped-call]


_lock = threading.Lock()
_spans: FlowSpans | None = None


def flow_spans(settings: Settings) -> FlowSpans:
    """This process's span recorder (one exporter however many steps record spans)."""
    global _spans
    with _lock:
        if _spans is None:
            exporter = OTLPSpanExporter(endpoint=settings.otlp_grpc_endpoint, insecure=True)
            processor = BatchSpanProcessor(
                exporter,
                max_queue_size=20_000,
                schedule_delay_millis=500,
                max_export_batch_size=512,
            )
            _spans = FlowSpans(processor, Resource.create({"service.name": SERVICE}))
            atexit.register(_spans.shutdown)
        return _spans
