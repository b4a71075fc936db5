"""The three services of the local stack: Kafka (Maven jars), Redis (Debian), Jaeger (Go).

Each is provisioned on first use into the git-ignored stack folder, started as a
local process bound to 127.0.0.1, and health-checked through its own protocol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

# Imported from where they are defined: confluent_kafka.admin re-exports them implicitly,
# which mypy --strict does not follow.
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._metadata import TopicMetadata
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from deploy.local.procs import run_with_progress
from fleetpulse.errors import StackError
from fleetpulse.settings import Settings

__all__ = ["HERE", "Jaeger", "Kafka", "Redis", "Service", "ensure_topics", "topic_configs"]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Service:
    """One local service; subclasses say how to provision, start and probe it."""

    settings: Settings
    root: Path  # the stack folder

    name = "service"
    port_setting = ""  # the port the health check talks to
    other_port_settings: tuple[str, ...] = ()  # further ports the service binds

    @property
    def port(self) -> int:
        port: int = getattr(self.settings, self.port_setting)
        return port

    def ports(self) -> dict[str, int]:
        """Every port the service binds, by the setting that names it."""
        names = (self.port_setting, *self.other_port_settings)
        return {n: int(getattr(self.settings, n)) for n in names}

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / f"{self.name}.log"

    def provision(self) -> None:
        """Fetch or build what the service needs; a no-op once done."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def after_start(self) -> None:
        """Work to do once the service answers (e.g. create topics)."""


class Kafka(Service):
    """Apache Kafka 4.x in KRaft combined mode, its jars copied from Maven Central by mvn."""

    name = "kafka"
    port_setting = "kafka_port"
    other_port_settings = ("kafka_controller_port",)

    @property
    def pom(self) -> Path:
        return HERE / "kafka" / "pom.xml"

    @property
    def libs(self) -> Path:
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()[:12]
        return self.root / "kafka" / f"libs-{digest}"

    @property
    def data_dir(self) -> Path:
        return self.root / "kafka" / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "kafka" / "server.properties"

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError("java not found on PATH; Kafka needs a JDK 17 or newer")
        return java

    def provision(self) -> None:
        if not (self.libs / ".complete").exists():
            mvn = shutil.which("mvn")
            if mvn is None:
                raise StackError("mvn not found on PATH; the local Kafka comes from Maven")
            print("provisioning Kafka: copying the broker jars with mvn (first run only)")
            run_with_progress(
                [
                    mvn,
                    "-B",
                    "-f",
                    str(self.pom),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={self.libs}",
                    "-DincludeScope=runtime",
                ],
                "mvn dependency:copy-dependencies",
                self.root / "logs" / "provision-kafka.log",
                cwd=HERE / "kafka",
            )
            (self.libs / ".complete").write_text("ok\n")
        self._write_config()
        self._format_storage()

    def _write_config(self) -> None:
        template = (HERE / "kafka" / "server.properties.in").read_text()
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            template.format(
                kafka_port=self.settings.kafka_port,
                controller_port=self.settings.kafka_controller_port,
                data_dir=self.data_dir,
                partitions=self.settings.kafka_partitions,
            )
        )

    def _format_storage(self) -> None:
        stamp = self.root / "kafka" / "formatted.json"
        wanted = {"controller_port": self.settings.kafka_controller_port}
        if (self.data_dir / "meta.properties").exists():
            if stamp.exists() and json.loads(stamp.read_text()) != wanted:
                raise StackError(
                    f"the Kafka data in {self.data_dir} was formatted for "
                    f"{json.loads(stamp.read_text())}, not {wanted}; set the old "
                    "FLEETPULSE_KAFKA_CONTROLLER_PORT back, or run `just stack-reset`"
                )
            return
        # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding; like
        # Kafka's Uuid.randomUuid(), never one starting with "-", which StorageTool's
        # argument parser would take for an option (1 run in 64 failed to format).
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(
            [
                self._java(),
                "-cp",
                f"{self.libs}/*",
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                cluster_id,
                "--config",
                str(self.config_path),
            ],
            check=True,
            capture_output=True,
        )
        stamp.write_text(json.dumps(wanted))

    def command(self) -> list[str]:
        return [
            self._java(),
            f"-Xms{min(512, self.settings.kafka_heap_mb)}m",
            f"-Xmx{self.settings.kafka_heap_mb}m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={HERE / 'kafka' / 'log4j2.yaml'}",
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(self.config_path),
        ]

    def _admin(self) -> AdminClient:
        return AdminClient(
            {"bootstrap.servers": f"127.0.0.1:{self.port}", "socket.timeout.ms": 2000},
            logger=_QUIET,
        )

    def healthy(self) -> bool:
        try:
            meta = self._admin().list_topics(timeout=2)
        except Exception:
            return False
        return len(meta.brokers) >= 1

    def after_start(self) -> None:
        ensure_topics(
            self._admin(),
            [self.settings.topic_reports, self.settings.topic_dlq, self.settings.topic_alerts],
            self.settings.kafka_partitions,
            self.settings.kafka_replication,
            reports_topic=self.settings.topic_reports,
        )


# librdkafka logs connection refusals while the broker starts; health checks expect them.
_QUIET = logging.getLogger("fleetpulse.stack.kafka-probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def topic_configs(replication: int, *, reports: bool) -> dict[str, str]:
    """The topic configs we set, and keep set, on a topic of ours.

    ``min.insync.replicas`` is 2 from a replication factor of 3 up, so an acks=all
    write (every 202 of ingest) is on two brokers before it is acknowledged, and one
    broker may be down without stopping writes; below 3 it is 1 (2 would stop every
    write while one of two brokers is away). The reports topic keeps the broker's
    append time as each message's timestamp: the dataflow's arrival clock, which no
    producer (or robot clock) can set.
    """
    configs = {"min.insync.replicas": "2" if replication >= 3 else "1"}
    if reports:
        configs["message.timestamp.type"] = "LogAppendTime"
    return configs


def ensure_topics(
    admin: AdminClient,
    names: list[str],
    partitions: int,
    replication: int,
    *,
    reports_topic: str | None = None,
) -> None:
    """Create the topics that do not exist yet with :func:`topic_configs`; alter the
    configs of existing ones to match (printing what changed); complain if one has
    another partition count. ``reports_topic`` names the topic of reports, if listed."""
    existing = admin.list_topics(timeout=10).topics
    for name in names:
        if name in existing and len(existing[name].partitions) != partitions:
            print(
                f"warning: topic {name} has {len(existing[name].partitions)} partitions, "
                f"settings ask for {partitions}; left as it is"
            )
    missing = [
        NewTopic(
            n,
            partitions,
            replication,
            config=topic_configs(replication, reports=n == reports_topic),
        )
        for n in names
        if n not in existing
    ]
    present = [n for n in names if n in existing]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=30).items():
            try:
                future.result(timeout=30)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise StackError(f"could not create topic {name}: {exc}") from exc
                present.append(name)  # made meanwhile, or not yet in the metadata we read
    # An existing topic keeps its replication factor, so its configs follow that one.
    wanted = {
        name: topic_configs(_replicas(admin, name, replication), reports=name == reports_topic)
        for name in present
    }
    _align_configs(admin, wanted)


def _replicas(admin: AdminClient, name: str, otherwise: int) -> int:
    """The replication factor of an existing topic (``otherwise`` if the metadata lacks it)."""
    topic: TopicMetadata | None = admin.list_topics(name, timeout=10).topics.get(name)
    if topic is None or topic.error is not None or not topic.partitions:
        return otherwise
    return min(len(p.replicas) for p in topic.partitions.values())


def _describe(admin: AdminClient, name: str, timeout_s: float = 15.0) -> dict[str, ConfigEntry]:
    """The topic's configs. A topic created a moment ago may be known to the controller
    but not yet to the broker that answers (UNKNOWN_TOPIC_OR_PART): asked again until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        (future,) = admin.describe_configs(
            [ConfigResource(ResourceType.TOPIC, name)], request_timeout=30
        ).values()
        try:
            entries: dict[str, ConfigEntry] = future.result(timeout=30)
            return entries
        except KafkaException as exc:
            unknown = exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() > deadline:
                raise StackError(f"could not read the configs of topic {name}: {exc}") from exc
        time.sleep(0.1)


def _align_configs(admin: AdminClient, wanted: dict[str, dict[str, str]]) -> None:
    """Set the configs in ``wanted`` (topic -> {name: value}) where a topic differs."""
    if not wanted:
        return
    changes: list[ConfigResource] = []
    for name in wanted:
        current = _describe(admin, name)
        differ = {
            key: value
            for key, value in wanted[name].items()
            if key not in current or current[key].value != value
        }
        if not differ:
            continue
        changed = ", ".join(
            f"{k} {current[k].value if k in current else '(unset)'} -> {v}"
            for k, v in differ.items()
        )
        print(f"note: topic {name}: {changed} (altered to match what fleetpulse creates)")
        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in differ.items()
        ]
        changes.append(ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries))
    if not changes:
        return
    for resource, future in admin.incremental_alter_configs(changes, request_timeout=30).items():
        try:
            future.result(timeout=30)
        except Exception as exc:
            raise StackError(
                f"could not alter the configs of topic {resource.name}: {exc}"
            ) from exc


class Redis(Service):
    """Debian's redis-server (installed with apt-get when none is on PATH)."""

    name = "redis"
    port_setting = "redis_port"

    def _binary(self) -> str | None:
        return shutil.which("redis-server")

    def provision(self) -> None:
        if self._binary() is not None:
            return
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            raise StackError(
                "redis-server not found on PATH; install it (Debian: apt-get install redis-server)"
            )
        print("provisioning Redis: apt-get install redis-server (first run only)")
        logs = self.root / "logs"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run_with_progress(
            [apt, "update"], "apt-get update", logs / "provision-redis.log", HERE, env
        )
        run_with_progress(
            [apt, "install", "-y", "--no-install-recommends", "redis-server"],
            "apt-get install redis-server",
            logs / "provision-redis.log",
            HERE,
            env,
        )
        if self._binary() is None:
            raise StackError("apt-get installed redis-server but it is still not on PATH")

    def command(self) -> list[str]:
        binary = self._binary()
        assert binary is not None
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def healthy(self) -> bool:
        try:
            client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
            return bool(client.ping())
        except redis.RedisError:
            return False


class Jaeger(Service):
    """Jaeger v2 built from the Go module proxy; OTLP in, in-memory storage, query API out."""

    name = "jaeger"
    port_setting = "jaeger_query_port"
    other_port_settings = (
        "jaeger_query_grpc_port",
        "jaeger_otlp_grpc_port",
        "jaeger_otlp_http_port",
    )
    module = "github.com/jaegertracing/jaeger"

    @property
    def version(self) -> str:
        """The Jaeger version the helper module (deploy/local/jaeger/go.mod) requires."""
        gomod = (HERE / "jaeger" / "go.mod").read_text()
        match = re.search(rf"^\s*{re.escape(self.module)} (v\S+)", gomod, re.MULTILINE)
        if match is None:
            raise StackError(f"deploy/local/jaeger/go.mod does not require {self.module}")
        return match.group(1)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / f"jaeger-{self.version}"

    @property
    def config_path(self) -> Path:
        return self.root / "jaeger" / "config.yaml"

    def provision(self) -> None:
        if not self.binary.exists():
            go = shutil.which("go")
            if go is None:
                raise StackError("go not found on PATH; the local Jaeger is built with Go")
            print(f"provisioning Jaeger {self.version}: go build (first run only, a few minutes)")
            partial = self.binary.with_name(self.binary.name + ".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            run_with_progress(
                [go, "build", "-v", "-o", str(partial), f"{self.module}/cmd/jaeger"],
                "go build jaeger",
                self.root / "logs" / "provision-jaeger.log",
                cwd=HERE / "jaeger",
            )
            partial.rename(self.binary)
        template = (HERE / "jaeger" / "config.yaml.in").read_text()
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        s = self.settings
        self.config_path.write_text(
            template.format(
                query_port=s.jaeger_query_port,
                query_grpc_port=s.jaeger_query_grpc_port,
                otlp_grpc_port=s.jaeger_otlp_grpc_port,
                otlp_http_port=s.jaeger_otlp_http_port,
            )
        )

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(self.config_path)]

    def healthy(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/api/services", timeout=1.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200
