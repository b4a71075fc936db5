"""Prometheus metrics of the API and the dataflow, each in a registry of its own.

Every metric object belongs to a registry made by its owner (an app, a dataflow
process), so two apps in one test process never share counters. With several API
worker processes, ``PROMETHEUS_MULTIPROC_DIR`` (set by ``api.serve``) makes the
values add up across workers when ``/metrics`` is scraped.
"""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

from fleetpulse.reload import ActiveConfig, Reload

__all__ = ["ApiMetrics", "ConfigMetrics", "DataflowMetrics", "dataflow_metrics"]

log = logging.getLogger("fleetpulse.metrics")

# Latency buckets for HTTP (s): a 202 waits for Kafka's acks=all, a few ms to seconds.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Freshness buckets (s): Kafka append -> Redis write.
_FRESH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ConfigMetrics:
    """Which config is active and what changes of the config file came to (fleetpulse.reload)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.info = Gauge(
            "fleetpulse_config_info",
            "1 for the active config, labelled with the hash of its hot settings (readyz "
            "shows the same hash).",
            ["hash"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.reloads = Counter(
            "fleetpulse_config_reloads",
            "Changes of the config file seen, by result: applied, invalid (the last good "
            "config stays), unchanged (no hot setting changed).",
            ["result"],
            registry=r,
        )
        self.restart_pending = Gauge(
            "fleetpulse_config_restart_pending",
            "1 while the config file changes restart-only settings (not applied until a restart).",
            registry=r,
            multiprocess_mode="livemax",
        )
        for result in ("applied", "invalid", "unchanged"):
            self.reloads.labels(result)
        self._hash: str | None = None

    def observe(self, result: Reload | None, active: ActiveConfig) -> None:
        """Count a change of the file (None: none, the start-up config) and show ``active``."""
        if result is not None:
            self.reloads.labels(result).inc()
        if active.hash != self._hash:
            if self._hash is not None:
                self.info.remove(self._hash)
            self.info.labels(active.hash).set(1)
            self._hash = active.hash
        self.restart_pending.set(1 if active.restart_pending else 0)


class ApiMetrics:
    """Requests and latency by route, accepted reports, errors by reason (503s included)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fleetpulse_api_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fleetpulse_api_request_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.accepted = Counter(
            "fleetpulse_ingest_reports_accepted",
            "Reports acknowledged by Kafka and answered 202.",
            registry=r,
        )
        self.rejected = Counter(
            "fleetpulse_api_rejected",
            "Requests answered with an error, by error code (e.g. invalid_report, unavailable).",
            ["reason"],
            registry=r,
        )
        self.limited = Counter(
            "fleetpulse_ingest_reports_limited",
            "Reports refused with 429 by a rate limit, by limit (token, robot).",
            ["limit"],
            registry=r,
        )
        self.config = ConfigMetrics(r)
        # Label children by (route, method, status): labels() validates, stringifies and
        # takes a lock on every call; route templates, methods and statuses are few.
        self._answered: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and observe its latency, by route template."""
        children = self._answered.get((route, method, status))
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
            self._answered[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The exposition text of this app (of every worker in multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


class DataflowMetrics:
    """What the dataflow did with the reports, and how fresh its writes are."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.registry = registry
        self.applied = Counter(
            "fleetpulse_flow_reports_applied", "Reports applied to live state.", registry=r
        )
        self.stale = Counter(
            "fleetpulse_flow_reports_stale",
            "Reports older in (boot, seq) than the robot's newest, dropped.",
            registry=r,
        )
        self.duplicate = Counter(
            "fleetpulse_flow_reports_duplicate",
            "Reports equal in (boot, seq) to the robot's newest, dropped.",
            registry=r,
        )
        self.dead = Counter(
            "fleetpulse_flow_dead_letters",
            "Messages sent to the DLQ, by kind (invalid, key, late, future, past, error, limit).",
            ["kind"],
            registry=r,
        )
        self.errors = Counter(
            "fleetpulse_flow_errors",
            "Exceptions in one robot's step, contained (the robot's state kept as it was).",
            registry=r,
        )
        self.skipped = Counter(
            "fleetpulse_flow_skipped_offsets",
            "Messages deleted by retention before the flow read them, by partition.",
            ["partition"],
            registry=r,
        )
        self.consumer_errors = Counter(
            "fleetpulse_flow_consumer_errors",
            "Kafka consumer and transport errors (retried, never dead-lettered), by code.",
            ["code"],
            registry=r,
        )
        self.alerts = Counter(
            "fleetpulse_flow_alerts", "Alerts raised, by kind.", ["kind"], registry=r
        )
        self.rules = Gauge(
            "fleetpulse_flow_alert_rules", "Alert rules in force in this process.", registry=r
        )
        self.rules_reloads = Counter(
            "fleetpulse_flow_alert_rules_reloads",
            "Changes of the rules file seen, by result (applied, invalid, unchanged).",
            ["result"],
            registry=r,
        )
        self.incidents = Counter(
            "fleetpulse_flow_incidents",
            "Incident versions from the alert rules, by severity and state (open, closed).",
            ["severity", "state"],
            registry=r,
        )
        self.freshness = Histogram(
            "fleetpulse_flow_freshness_seconds",
            "Kafka append time of an applied report -> its state written to Redis.",
            buckets=_FRESH_BUCKETS,
            registry=r,
        )
        self.writes = Counter(
            "fleetpulse_flow_redis_batches", "Batches written to Redis.", registry=r
        )
        self.republished = Counter(
            "fleetpulse_flow_republished_states",
            "Live states written again because Redis may have lost some (a failover, a "
            "restart, an empty Redis, `just rebuild-state`).",
            registry=r,
        )
        self.republishes = Counter(
            "fleetpulse_flow_republishes",
            "Re-publishes of the whole live state this process claimed (it found Redis "
            "not to be the projection it last completed), and those it saw complete.",
            ["event"],
            registry=r,
        )
        self.retired = Counter(
            "fleetpulse_flow_robots_retired",
            "Robots retired, by why: admin (POST .../retire) or retention "
            "(FLEETPULSE_RETIRE_AFTER_S without a report).",
            ["why"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "fleetpulse_flow_consumer_lag",
            "Messages of a reports-topic partition not yet read by this process.",
            ["partition"],
            registry=r,
        )
        self.config = ConfigMetrics(r)


_lock = threading.Lock()
_flow_metrics: DataflowMetrics | None = None


def dataflow_metrics(host: str, port: int, process_id: int) -> DataflowMetrics:
    """This process's dataflow metrics, served once on ``host:port + process_id`` (port 0: not).

    They live in the default registry, so Bytewax's own metrics show in the same scrape.
    """
    global _flow_metrics
    with _lock:
        if _flow_metrics is None:
            _flow_metrics = DataflowMetrics(REGISTRY)
            if port:
                try:
                    start_http_server(port + process_id, addr=host, registry=REGISTRY)
                except OSError as exc:
                    # Metrics are for watching; a taken port must not stop the processing.
                    log.error(
                        "dataflow metrics not served on %s:%d (FLEETPULSE_DATAFLOW_METRICS_PORT"
                        " + process id): %s",
                        host,
                        port + process_id,
                        exc,
                    )
        return _flow_metrics
