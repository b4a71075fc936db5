"""Every ``FLEETPULSE_*`` environment variable, in one frozen object.

Each entry point (the API server, the dataflow, the simulator, the local stack)
calls :func:`load_settings` once and passes the result down; nothing reads the
environment at import time. A bad value stops start-up with a
:class:`~fleetpulse.errors.ConfigError` naming the variable, the value and what is
allowed.

``python -m fleetpulse.settings`` prints the table of variables that the README
carries (a unit test keeps the two equal).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from fleetpulse.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "SECRET_FIELDS",
    "Settings",
    "env_name",
    "load_settings",
    "markdown_table",
    "masked_url",
    "overlay_settings",
    "shown",
    "to_env",
]

ENV_PREFIX = "FLEETPULSE_"
# The file read from FLEETPULSE_CONFIG_DIR (fleetpulse.reload): a ConfigMap's key.
CONFIG_FILE = "fleetpulse.yaml"

Port = Annotated[int, Meta(ge=1, le=65535)]
TopicName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
Seconds = Annotated[float, Meta(gt=0)]


def _doc(text: str, **constraints: Any) -> Meta:
    return Meta(description=text, **constraints)


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration of one fleetpulse process."""

    # --- local stack (deploy/local) ---------------------------------------------------
    stack_dir: Annotated[
        str, _doc("Folder for the local stack's binaries, data, logs and pids.")
    ] = ".stack"
    kafka_port: Annotated[Port, _doc("Local Kafka broker port (PLAINTEXT listener).")] = 59092
    kafka_controller_port: Annotated[Port, _doc("Local Kafka KRaft controller port.")] = 59093
    kafka_heap_mb: Annotated[
        int, _doc("Heap of the local Kafka JVM, MiB (each HA node: half of it).", ge=256)
    ] = 1024
    ha_kafka_port: Annotated[
        Port,
        _doc(
            "HA stack: broker port of Kafka node 1 (nodes 2, 3: +10, +20); below Linux's "
            "ephemeral range (32768-60999), where a client reconnecting to a killed node "
            "can take the node's port as its own and keep it from starting again.",
        ),
    ] = 29092
    ha_kafka_controller_port: Annotated[
        Port, _doc("HA stack: KRaft controller port of Kafka node 1 (nodes 2, 3: +10, +20).")
    ] = 29093
    redis_port: Annotated[Port, _doc("Local redis-server port.")] = 56379
    sentinel_down_after_ms: Annotated[
        int,
        _doc("HA stack: how long a silent Redis master is down for the Sentinels.", ge=100),
    ] = 5000
    sentinel_failover_timeout_ms: Annotated[
        int, _doc("HA stack: Sentinel failover-timeout, ms.", ge=1000)
    ] = 15000
    jaeger_query_port: Annotated[Port, _doc("Local Jaeger query API port.")] = 16686
    jaeger_query_grpc_port: Annotated[Port, _doc("Local Jaeger query gRPC port.")] = 16685
    jaeger_otlp_grpc_port: Annotated[Port, _doc("Local Jaeger OTLP/gRPC receiver port.")] = 4317
    jaeger_otlp_http_port: Annotated[Port, _doc("Local Jaeger OTLP/HTTP receiver port.")] = 4318
    # The local Kubernetes control plane (`just k8s-up`): below Linux's ephemeral range.
    k8s_etcd_port: Annotated[Port, _doc("Local Kubernetes: etcd client port.")] = 22379
    k8s_etcd_peer_port: Annotated[Port, _doc("Local Kubernetes: etcd peer port.")] = 22380
    k8s_apiserver_port: Annotated[Port, _doc("Local Kubernetes: kube-apiserver port.")] = 26443
    k8s_controller_manager_port: Annotated[
        Port, _doc("Local Kubernetes: kube-controller-manager's secure (health) port.")
    ] = 20257
    k8s_scheduler_port: Annotated[
        Port, _doc("Local Kubernetes: kube-scheduler's secure (health) port.")
    ] = 20259
    k8s_kubelet_port: Annotated[
        Port, _doc("Local Kubernetes: the kubelet's API port (on the node's address).")
    ] = 20250
    k8s_kubelet_healthz_port: Annotated[
        Port, _doc("Local Kubernetes: the kubelet's health port.")
    ] = 20248
    k8s_proxy_healthz_port: Annotated[Port, _doc("Local Kubernetes: kube-proxy's health port.")] = (
        20256
    )
    k8s_proxy_metrics_port: Annotated[
        Port, _doc("Local Kubernetes: kube-proxy's metrics port.")
    ] = 20249
    k8s_containerd_metrics_port: Annotated[
        Port, _doc("Local Kubernetes: containerd's metrics (and health) port.")
    ] = 21338
    k8s_dns_health_port: Annotated[
        Port, _doc("Local Kubernetes: the cluster DNS's health port.")
    ] = 20180
    k8s_dns_ready_port: Annotated[
        Port, _doc("Local Kubernetes: the cluster DNS's readiness port.")
    ] = 20181
    k8s_volumes_port: Annotated[
        Port, _doc("Local Kubernetes: the volume provisioner's health port.")
    ] = 20251
    k8s_node_ip: Annotated[
        str,
        _doc(
            "Local Kubernetes: the node's address (the kubelet refuses a loopback one). "
            "Empty: the address of the interface with the default route."
        ),
    ] = ""
    k8s_node: Annotated[
        Literal["kubelet", "kwok"],
        _doc(
            "Local Kubernetes: `kubelet` runs real pods (containerd, kube-proxy, DNS); "
            "`kwok` simulates a node where a kubelet cannot run (pods only pretend to run)."
        ),
    ] = "kubelet"
    stack_start_timeout_s: Annotated[
        Seconds, _doc("How long `stack-up` waits for a service to become healthy.")
    ] = 90.0

    # --- Kafka clients ----------------------------------------------------------------
    kafka_bootstrap: Annotated[
        str | None,
        _doc("Kafka bootstrap servers; default: the local stack's broker (127.0.0.1:KAFKA_PORT)."),
    ] = None
    kafka_partitions: Annotated[
        int,
        _doc(
            "Partitions of the topics we create; a multiple of the dataflow's worker count.", ge=1
        ),
    ] = 12
    kafka_replication: Annotated[int, _doc("Replication factor of the topics we create.", ge=1)] = 1
    topic_reports: Annotated[TopicName, _doc("Topic of accepted robot reports.")] = "robot.reports"
    topic_dlq: Annotated[TopicName, _doc("Dead-letter topic for undecodable reports.")] = (
        "robot.reports.dlq"
    )
    topic_alerts: Annotated[TopicName, _doc("Topic of alerts for downstream consumers.")] = (
        "robot.alerts"
    )
    topic_incidents: Annotated[
        TopicName,
        _doc("Topic of incident versions (opened, acknowledged, closed) from the alert rules."),
    ] = "robot.incidents"

    # --- Redis ------------------------------------------------------------------------
    redis_url: Annotated[
        str | None,
        _doc("Redis URL; default: the local stack's server (redis://127.0.0.1:REDIS_PORT/0)."),
    ] = None
    redis_prefix: Annotated[
        str, _doc("Prefix of every Redis key we write.", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    ] = "fp"
    redis_sentinels: Annotated[
        str,
        _doc(
            "Comma-separated host:port of Redis Sentinels; when set, the master is found "
            "through them (REDIS_URL then only supplies db and password).",
            pattern=r"^$|^[A-Za-z0-9_.-]+:[0-9]{1,5}(,[A-Za-z0-9_.-]+:[0-9]{1,5})*$",
        ),
    ] = ""
    redis_sentinel_master: Annotated[str, _doc("Sentinel service name of the master.")] = "mymaster"
    redis_read_from_replicas: Annotated[
        bool, _doc("With Sentinel: serve API reads from a replica (may lag the master).")
    ] = False
    history_len: Annotated[
        int, _doc("Applied reports kept per robot for /history.", ge=1, le=100_000)
    ] = 100
    changes_len: Annotated[
        int, _doc("Entries kept in the change stream behind /v1/stream.", ge=100)
    ] = 100_000
    alerts_len: Annotated[int, _doc("Entries kept in the alerts stream.", ge=100)] = 100_000

    # --- credentials and TLS of the clients (issue 17: least privilege) --------------
    # Two Redis identities: the writer (the dataflow's sink and the tools that write) and
    # the reader (query API, dashboard, SSE). state/acl.py makes the ACL users.
    redis_username: Annotated[
        str,
        _doc(
            "Redis ACL user of the writer (the dataflow's sink, rebuild-state); empty: the "
            "user in FLEETPULSE_REDIS_URL, else `default`.",
            pattern=r"^[A-Za-z0-9_.-]{0,64}$",
        ),
    ] = ""
    redis_password: Annotated[
        str, _doc("Password of FLEETPULSE_REDIS_USERNAME (or of `default`); secret.")
    ] = ""
    redis_api_username: Annotated[
        str,
        _doc(
            "Redis ACL user of the readers (query API, dashboard, /v1/stream): a read-only "
            "user. Empty: the writer's credentials.",
            pattern=r"^[A-Za-z0-9_.-]{0,64}$",
        ),
    ] = ""
    redis_api_password: Annotated[
        str, _doc("Password of FLEETPULSE_REDIS_API_USERNAME; secret.")
    ] = ""
    redis_ca_file: Annotated[
        str,
        _doc(
            "PEM file of the CA that signed the Redis servers' (and Sentinels') TLS "
            "certificates, for `rediss://` URLs; empty: the system's CAs."
        ),
    ] = ""
    redis_sentinel_username: Annotated[
        str,
        _doc(
            "ACL user the clients authenticate to the Sentinels with; empty: none (or "
            "`default` when FLEETPULSE_REDIS_SENTINEL_PASSWORD is set).",
            pattern=r"^[A-Za-z0-9_.-]{0,64}$",
        ),
    ] = ""
    redis_sentinel_password: Annotated[
        str, _doc("Password for the Sentinels (their `requirepass` or ACL user); secret.")
    ] = ""
    redis_sentinel_tls: Annotated[
        bool,
        _doc(
            "Reach the Sentinels over TLS (verified with FLEETPULSE_REDIS_CA_FILE); the "
            "data nodes use TLS when FLEETPULSE_REDIS_URL is `rediss://`."
        ),
    ] = False
    kafka_security_protocol: Annotated[
        Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
        _doc("How every Kafka client of the product reaches the brokers (librdkafka's)."),
    ] = "PLAINTEXT"
    kafka_sasl_mechanism: Annotated[
        Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"],
        _doc("SASL mechanism with SASL_PLAINTEXT or SASL_SSL (then required); else empty."),
    ] = ""
    kafka_sasl_username: Annotated[str, _doc("SASL user of the Kafka clients.")] = ""
    kafka_sasl_password: Annotated[str, _doc("SASL password of the Kafka clients; secret.")] = ""
    kafka_ca_file: Annotated[
        str,
        _doc(
            "PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL); "
            "empty: the system's CAs."
        ),
    ] = ""

    # --- tracing, logs ----------------------------------------------------------------
    otlp_endpoint: Annotated[
        str | None,
        _doc("OTLP/gRPC endpoint for traces; default: the local Jaeger (http://127.0.0.1:4317)."),
    ] = None
    jaeger_query_url: Annotated[
        str | None,
        _doc("Jaeger query API base URL; default: the local Jaeger (http://127.0.0.1:16686)."),
    ] = None
    trace_sample_ratio: Annotated[
        float,
        _doc(
            "Share of traces kept (parent-based ratio sampler; a request whose traceparent "
            "is sampled and trusted, FLEETPULSE_TRACE_TRUST, is always traced).",
            ge=0.0,
            le=1.0,
        ),
    ] = 0.01
    trace_trust: Annotated[
        str,
        _doc(
            "Token scopes (comma-separated: ingest, read, admin) whose requests may bring "
            "their trace context in: their `traceparent` is continued, its sampled flag "
            "honoured. Any other request (always one without a valid token) starts a trace "
            "of its own, sampled at FLEETPULSE_TRACE_SAMPLE_RATIO and linked to the "
            "caller's context. `all`: every caller's context is continued; empty: none.",
            pattern=r"^(all|((ingest|read|admin)(,(ingest|read|admin))*))?$",
        ),
    ] = "admin"
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"], _doc("Log level of our own loggers.")
    ] = "INFO"

    # --- configuration file (fleetpulse.reload) ---------------------------------------
    rules_file: Annotated[
        str,
        _doc(
            'Alert rules file (YAML or JSON; README, "Alert rules"), read at start and '
            "watched: a good change applies within a second, a bad one is logged and the "
            "rules in force stay. PUT /v1/rules (admin) replaces it. Empty: no rules."
        ),
    ] = ""
    config_dir: Annotated[
        str,
        _doc(
            f"Folder holding `{CONFIG_FILE}` (settings by field name, e.g. `low_battery_pct: "
            "15`) over these variables, watched for changes: thresholds and the log level "
            "apply live, anything else after a restart. A Kubernetes ConfigMap mounted as a "
            "directory (not `subPath`). Empty: no file."
        ),
    ] = ""

    # --- HTTP API ---------------------------------------------------------------------
    api_host: Annotated[str, _doc("Address the API servers bind to.")] = "127.0.0.1"
    ingest_port: Annotated[Port, _doc("Port of the ingest routes (the webhook server).")] = 58081
    query_port: Annotated[Port, _doc("Port of the query routes (the API server).")] = 58080
    api_workers: Annotated[int, _doc("ASGI server worker processes.", ge=1, le=64)] = 1
    dashboard_port: Annotated[
        Port, _doc("Port of the dashboard (the page, the query routes and its live feed).")
    ] = 58082
    dashboard_metrics: Annotated[
        str,
        _doc(
            "Comma-separated /metrics URLs the dashboard's pipeline panel reads (ingest and "
            "dataflow processes); empty: the local ingest server and dataflow process 0.",
            pattern=r"^(https?://[^,\s]+(,\s*https?://[^,\s]+)*)?$",
        ),
    ] = ""
    dashboard_tick_s: Annotated[
        float,
        _doc(
            "How often the dashboard's feed sends pipeline figures and the summary.", ge=0.2, le=60
        ),
    ] = 2.0
    jaeger_ui_url: Annotated[
        str,
        _doc(
            "Base URL of a Jaeger web UI the dashboard links traces to; empty: no link.",
            pattern=r"^(https?://\S+)?$",
        ),
    ] = ""
    api_tokens: Annotated[
        str,
        _doc(
            "Bearer tokens as comma-separated `scope:sha256-hex` (scope ingest, read or "
            "admin); `just token` makes one. Empty: every request is refused.",
        ),
    ] = ""
    webhook_secrets: Annotated[
        str,
        _doc(
            "Ingest tokens that must sign each post (HMAC-SHA256 over timestamp and body in "
            "X-Fleetpulse-Signature), as `<key id>=<secret>[|<next secret>]` entries: the key "
            "id is the first 12 hex digits of the token's SHA-256, or `*` for every ingest "
            "token; two secrets while rotating. Empty: no token signs."
        ),
    ] = ""
    webhook_tolerance_s: Annotated[
        float,
        _doc(
            "Replay window of signed posts: how far a signature's timestamp may be from the "
            "server's clock.",
            gt=0,
            le=3600,
        ),
    ] = 300.0
    ingest_token_rate: Annotated[
        float,
        _doc(
            "Reports per second one ingest token may post (a token bucket per token, per "
            "server; divided among FLEETPULSE_API_WORKERS); 429 with Retry-After beyond. "
            "0: no limit.",
            ge=0,
        ),
    ] = 0.0
    ingest_token_burst: Annotated[
        int, _doc("Reports a token may post at once above its rate (its bucket's size).", ge=1)
    ] = 20_000
    ingest_robot_rate: Annotated[
        float,
        _doc(
            "Reports per second one robot id may be posted (a token bucket per robot, per "
            "server; divided among FLEETPULSE_API_WORKERS); 429 with Retry-After beyond. "
            "0: no limit.",
            ge=0,
        ),
    ] = 0.0
    ingest_robot_burst: Annotated[
        int,
        _doc(
            "Reports of one robot accepted at once above its rate: room for a backlog "
            "uploaded after a reconnect (at least the largest batch it sends).",
            ge=1,
        ),
    ] = 1200
    sim_token: Annotated[
        str, _doc("Bearer token (ingest scope) the simulator posts with; `--token` overrides.")
    ] = ""
    produce_timeout_s: Annotated[
        Seconds, _doc("How long ingest waits for Kafka to confirm before answering 503.")
    ] = 5.0
    producer_queue_max: Annotated[
        int, _doc("Reports the ingest producer may hold unconfirmed before 503.", ge=1)
    ] = 100_000
    max_batch_reports: Annotated[
        int, _doc("Most reports in one POST /v1/reports/batch.", ge=1, le=100_000)
    ] = 1000
    max_body_bytes: Annotated[int, _doc("Largest request body accepted, bytes.", ge=1024)] = (
        1_048_576
    )
    max_future_s: Annotated[
        float,
        _doc(
            "How far ahead of the receiving clock a report's ts may be (ingest: the "
            "server's clock, 422 beyond; dataflow: the Kafka append time, dead letter "
            "`future` beyond).",
            ge=0,
            le=31_536_000,
        ),
    ] = 300.0
    max_age_s: Annotated[
        float,
        _doc(
            "How far behind the receiving clock a report's ts may be (422 / dead letter "
            "`past` beyond): robots may upload buffered reports this old.",
            gt=0,
            le=315_360_000,
        ),
    ] = 604_800.0

    # --- dataflow ---------------------------------------------------------------------
    offline_after_s: Annotated[
        float,
        _doc(
            "Time without a report arriving (Kafka append time, not the flow's clock) "
            "before a robot is offline.",
            gt=0,
            le=2_592_000,
        ),
    ] = 30.0
    low_battery_pct: Annotated[
        float, _doc("Battery level (%) at or below which low_battery fires.", ge=0, le=100)
    ] = 20.0
    battery_ok_pct: Annotated[
        float,
        _doc("Battery level (%) a low robot must reach again to clear (hysteresis).", ge=0, le=100),
    ] = 25.0
    window_s: Annotated[
        int, _doc("Event-time tumbling window length, seconds.", ge=1, le=86_400)
    ] = 60
    allowed_lateness_s: Annotated[
        float,
        _doc(
            "How late (event time) a report may be and still count in its window.",
            ge=0,
            le=86_400,
        ),
    ] = 10.0
    stuck_after: Annotated[
        int,
        _doc(
            "Reports in a row older than a robot's newest after which it is stuck "
            "(alert `stuck`; an admin can reset its ordering).",
            ge=1,
        ),
    ] = 10
    retire_after_s: Annotated[
        float,
        _doc(
            "Time without a report arriving after which a robot is retired: its state, "
            "keys, index entries and summary counts removed (0: never; else above "
            "OFFLINE_AFTER_S). A report later makes it a new robot.",
            ge=0,
            le=315_360_000,
        ),
    ] = 604_800.0
    max_robots: Annotated[
        int,
        _doc(
            "Distinct robots the dataflow keeps (0: no limit); each shard takes its share "
            "(MAX_ROBOTS / SHARDS, rounded up), a report of a new robot beyond it is a "
            "dead letter `limit`. Set it ~10% above the fleet: shards fill unevenly.",
            ge=0,
        ),
    ] = 2_000_000
    shards: Annotated[
        int,
        _doc(
            "Keyed-state shards of the dataflow (robots are hashed into them): at least "
            "8 x the total worker count; fixed for the life of a recovery store.",
            ge=1,
            le=4096,
        ),
    ] = 64
    recovery_dir: Annotated[
        str, _doc("Bytewax recovery partitions; empty turns recovery off (re-reads Kafka).")
    ] = ".stack/recovery"
    recovery_partitions: Annotated[int, _doc("Recovery partitions created on first run.", ge=1)] = 2
    recovery_per_process: Annotated[
        bool,
        _doc(
            "Each process of a cluster creates only its share of the recovery partitions "
            "(partition p on process p mod processes), for a recovery volume per process "
            "(containers, Kubernetes); off: the processes share one folder.",
        ),
    ] = False
    # Whole seconds: Bytewax's runner takes no fractions (BYTEWAX_SNAPSHOT_INTERVAL).
    snapshot_interval_s: Annotated[
        int, _doc("Bytewax epoch / snapshot interval, whole seconds.", ge=1, le=3600)
    ] = 2
    backup_interval_s: Annotated[
        int,
        _doc("How long old snapshots are kept for other workers to resume, whole seconds.", ge=0),
    ] = 0
    dataflow_metrics_port: Annotated[
        int,
        _doc(
            "Port of the dataflow's /metrics; process N of a cluster uses this + N; 0: off.",
            ge=0,
            le=65535,
        ),
    ] = 9464
    metrics_host: Annotated[str, _doc("Address the dataflow's /metrics binds to.")] = "127.0.0.1"

    # --- notifications (the notifier: incidents topic -> webhooks) ----------------------
    notify_secrets: Annotated[
        str,
        _doc(
            "Secrets that sign each target's notifications, `<target name>=<secret>` entries "
            "(comma-separated); a target without one is sent unsigned."
        ),
    ] = ""
    notify_attempts: Annotated[
        int,
        _doc("Tries of one notification before it is counted dead (back-off between).", ge=1),
    ] = 6
    notify_backoff_s: Annotated[
        float,
        _doc("First wait between tries of a notification, doubling up to 30 s.", gt=0, le=60),
    ] = 0.5
    notify_timeout_s: Annotated[
        float, _doc("How long one webhook POST may take.", gt=0, le=120)
    ] = 5.0
    notify_metrics_port: Annotated[
        int, _doc("Port of the notifier's /metrics; 0: off.", ge=0, le=65535)
    ] = 9474
    metrics_port_per_process: Annotated[
        bool,
        _doc(
            "Process N of a dataflow cluster serves /metrics on FLEETPULSE_DATAFLOW_METRICS_PORT "
            "+ N (processes sharing one host); off: every process on the port itself (a pod "
            "each, Kubernetes).",
        ),
    ] = True
    consumer_group: Annotated[str, _doc("Kafka consumer group label of the dataflow.")] = (
        "fleetpulse-dataflow"
    )
    chaos: Annotated[
        str,
        _doc(
            "Fault injection, for tests only: `point:probability` pairs (points: "
            "snapshot, sink) at which the dataflow kills itself with SIGKILL.",
            pattern=r"^$|^(snapshot|sink):(0|1|0?\.[0-9]+)(,(snapshot|sink):(0|1|0?\.[0-9]+))*$",
        ),
    ] = ""

    @property
    def kafka_bootstrap_servers(self) -> str:
        """Bootstrap servers for clients: explicit, or the local stack's broker."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_dsn(self) -> str:
        """Redis URL for clients: explicit, or the local stack's server."""
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def otlp_grpc_endpoint(self) -> str:
        """OTLP/gRPC endpoint: explicit, or the local Jaeger."""
        return self.otlp_endpoint or f"http://127.0.0.1:{self.jaeger_otlp_grpc_port}"

    @property
    def dashboard_metrics_urls(self) -> list[str]:
        """The /metrics URLs the dashboard reads: explicit, or the local ingest and flow."""
        if self.dashboard_metrics:
            return [u.strip() for u in self.dashboard_metrics.split(",") if u.strip()]
        local = [f"http://127.0.0.1:{self.ingest_port}/metrics"]
        if self.dataflow_metrics_port:
            local.append(f"http://127.0.0.1:{self.dataflow_metrics_port}/metrics")
        return local

    @property
    def jaeger_api(self) -> str:
        """Jaeger query API base URL: explicit, or the local Jaeger."""
        return self.jaeger_query_url or f"http://127.0.0.1:{self.jaeger_query_port}"


# Settings whose values are secrets (or, for the token hashes, close to one): never in a
# log line or an error message; shown as "(set)" or "(empty)".
SECRET_FIELDS = frozenset(
    {
        "api_tokens",
        "webhook_secrets",
        "notify_secrets",
        "sim_token",
        "redis_password",
        "redis_api_password",
        "redis_sentinel_password",
        "kafka_sasl_password",
    }
)
# Settings that are URLs which may carry a password (redis://user:secret@host): shown
# with the password masked.
_URL_FIELDS = frozenset({"redis_url"})


def shown(field: str, value: Any) -> str:
    """``value`` of ``field`` as a log line may show it (secrets masked)."""
    if field in SECRET_FIELDS:
        return "(set)" if value else "(empty)"
    if field in _URL_FIELDS and isinstance(value, str):
        return repr(masked_url(value))
    return repr(value)


def masked_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``."""
    return re.sub(r"^([a-z]+://[^:@/]*):[^@/]*@", r"\1:***@", url)


def _check_security(s: Settings) -> None:
    """The rules between the credential and TLS settings (each alone is checked by type)."""
    sasl = s.kafka_security_protocol.startswith("SASL_")
    proto = env_name("kafka_security_protocol")
    if sasl and not (s.kafka_sasl_mechanism and s.kafka_sasl_username and s.kafka_sasl_password):
        missing = [
            env_name(f)
            for f in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
            if not getattr(s, f)
        ]
        raise ConfigError(
            f"{proto}={s.kafka_security_protocol} needs {', '.join(missing)} "
            "(the mechanism, user and password the brokers know)"
        )
    if not sasl and (s.kafka_sasl_mechanism or s.kafka_sasl_username or s.kafka_sasl_password):
        raise ConfigError(
            f"{env_name('kafka_sasl_mechanism')}, {env_name('kafka_sasl_username')} and "
            f"{env_name('kafka_sasl_password')} apply only with {proto}=SASL_PLAINTEXT or "
            f"SASL_SSL, not {s.kafka_security_protocol}"
        )
    if s.kafka_ca_file and s.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        raise ConfigError(
            f"{env_name('kafka_ca_file')} applies only with {proto}=SSL or SASL_SSL, "
            f"not {s.kafka_security_protocol}"
        )
    if s.redis_ca_file and not (s.redis_dsn.startswith("rediss://") or s.redis_sentinel_tls):
        raise ConfigError(
            f"{env_name('redis_ca_file')} is set but {env_name('redis_url')} is not a "
            f"rediss:// (TLS) URL and {env_name('redis_sentinel_tls')} is off"
        )


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return ENV_PREFIX + field.upper()


def to_env(settings: Settings) -> dict[str, str]:
    """The ``FLEETPULSE_*`` variables that reproduce ``settings`` in another process."""
    env: dict[str, str] = {}
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        if value is None:
            continue
        env[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _fields() -> dict[str, msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.name: f for f in info.fields}


def _allowed(t: msgspec.inspect.Type) -> str:
    """Describe in words the values a field's type allows."""
    if isinstance(t, msgspec.inspect.Metadata):
        return _allowed(t.type)
    if isinstance(t, msgspec.inspect.UnionType):
        parts = [_allowed(x) for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
        return " or ".join(parts) + " (or unset)"
    if isinstance(t, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(str(v) for v in t.values)
    if isinstance(t, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        kind = "an integer" if isinstance(t, msgspec.inspect.IntType) else "a number"
        bounds = [
            f"{op} {v}"
            for op, v in (
                (">=", t.ge),
                (">", t.gt),
                ("<=", t.le),
                ("<", t.lt),
            )
            if v is not None
        ]
        return kind + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(t, msgspec.inspect.StrType):
        return f"a string matching {t.pattern}" if t.pattern else "a string"
    if isinstance(t, msgspec.inspect.BoolType):
        return "true or false"
    return type(t).__name__


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``FLEETPULSE_*`` variables (default: ``os.environ``).

    Raises :class:`ConfigError` for an unknown ``FLEETPULSE_`` variable or a bad value.
    """
    return overlay_settings(environ, {}, "")


def overlay_settings(
    environ: Mapping[str, str] | None, values: Mapping[Any, Any], source: str
) -> Settings:
    """:class:`Settings` from ``FLEETPULSE_*`` variables with ``values`` over them.

    ``values`` are a config file's (``source`` names it in errors): keys are field names
    (``offline_after_s``, not ``FLEETPULSE_OFFLINE_AFTER_S``), values strings or the
    file's own numbers and booleans, checked by the same schema as the variables.
    Raises :class:`ConfigError` naming the variable or key, the value and what is allowed.
    """
    env = os.environ if environ is None else environ
    fields = _fields()
    raw: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in fields:
            known = ", ".join(env_name(f) for f in fields)
            raise ConfigError(f"{key} is not a fleetpulse setting. Known settings: {known}")
        raw[name] = value
    for key in values:
        if key not in fields:
            name = str(key)
            hint = (
                f"write {name[len(ENV_PREFIX) :].lower()}, not {name}"
                if name.upper().startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() in fields
                else "keys are setting names in lower case without FLEETPULSE_ (e.g. "
                "offline_after_s for FLEETPULSE_OFFLINE_AFTER_S); known: " + ", ".join(fields)
            )
            raise ConfigError(f"{source}: {name!r} is not a fleetpulse setting: {hint}")
    raw.update(values)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, raw, fields, values, source) from None
    _check_security(settings)
    return settings


def _explain(
    exc: msgspec.ValidationError,
    raw: Mapping[str, Any],
    fields: Mapping[str, msgspec.inspect.Field],
    from_file: Mapping[Any, Any],
    source: str,
) -> ConfigError:
    match = re.search(r"at `\$\.(\w+)`", str(exc))
    if match is None or match.group(1) not in fields:
        return ConfigError(f"invalid fleetpulse settings: {exc}")
    name = match.group(1)
    reason = str(exc)[: match.start()].rstrip(" -")
    where = f"{source}: {name}: " if name in from_file else f"{env_name(name)}="
    value = shown(name, raw.get(name, "")) if name in SECRET_FIELDS else repr(raw.get(name, ""))
    return ConfigError(
        f"{where}{value} is not allowed ({reason}); expected {_allowed(fields[name].type)}"
    )


def markdown_table() -> str:
    """The README's table of settings, generated from the Settings class."""
    rows = ["| variable | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for name, field in _fields().items():
        t = field.type
        desc = ""
        if isinstance(t, msgspec.inspect.Metadata):
            desc = (t.extra_json_schema or {}).get("description", "")
            t = t.type
        default = "" if field.default is msgspec.NODEFAULT else field.default
        default_text = "(derived)" if default is None else f"`{default}`"
        rows.append(f"| `{env_name(name)}` | {default_text} | {_allowed(t)} | {desc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
