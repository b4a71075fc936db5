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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import redis
from confluent_kafka.admin import AdminClient

from deploy.local.procs import run_with_progress
from fleetpulse.errors import StackError
from fleetpulse.settings import Settings, env_name
from fleetpulse.topics import ensure_topics, product_topics, topic_configs, wait_for_brokers
from state.acl import RedisUsers, acl_file

__all__ = [
    "HA_NODES",
    "HERE",
    "Jaeger",
    "Kafka",
    "Redis",
    "RedisReplica",
    "Sentinel",
    "Service",
    "apt_install",
    "ensure_topics",
    "quorum_leader",
    "topic_configs",
]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Service:
    """One local service; subclasses say how to provision, start and probe it.

    ``node`` 0 is the single-node stack's service; 1-3 are the nodes of the HA stack
    (:data:`HA_NODES`), each on ports of its own (:meth:`port_offset`).
    """

    settings: Settings
    root: Path  # the stack folder
    node: int = 0

    kind = "service"
    port_setting = ""  # the port the health check talks to
    other_port_settings: ClassVar[tuple[str, ...]] = ()  # further ports it binds

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.node}" if self.node else self.kind

    @property
    def port_offset(self) -> int:
        """Added to every port setting of the service (HA node n: 10 * (n - 1))."""
        return 10 * (self.node - 1) if self.node else 0

    def port_settings(self) -> tuple[str, ...]:
        """The settings of the ports it binds, the health-checked one first."""
        return (self.port_setting, *self.other_port_settings)

    @property
    def port(self) -> int:
        port: int = getattr(self.settings, self.port_settings()[0])
        return port + self.port_offset

    def ports(self) -> dict[str, int]:
        """Every port the service binds, by the setting that names it."""
        return {n: int(getattr(self.settings, n)) + self.port_offset for n in self.port_settings()}

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

    def role(self) -> str:
        """What the node does in its cluster right now, for `stack-status` ('' alone)."""
        return ""


# The HA stack's node numbers: 3 Kafka nodes (broker + controller each), 3 Sentinels.
HA_NODES = (1, 2, 3)


class Kafka(Service):
    """Apache Kafka 4.x in KRaft combined mode, its jars copied from Maven Central by mvn.

    Alone (node 0): one broker + controller, topics with one copy. In the HA stack, node
    n of 3 (node id n, the HA ports +10 * (n - 1)): one cluster id formatted on all three, the
    same static controller quorum on all three, 3 copies of every topic with 2 in sync
    for a write to be acknowledged, unclean leader election off.
    """

    kind = "kafka"
    port_setting = "kafka_port"
    other_port_settings = ("kafka_controller_port",)

    @property
    def ha(self) -> bool:
        return self.node != 0

    @property
    def replication(self) -> int:
        """The replication factor of the topics this stack creates."""
        return len(HA_NODES) if self.ha else self.settings.kafka_replication

    @property
    def heap_mb(self) -> int:
        # Three JVMs share the machine in HA: each gets half of the single node's heap.
        heap = self.settings.kafka_heap_mb
        return max(256, heap // 2) if self.ha else heap

    @property
    def pom(self) -> Path:
        return HERE / "kafka" / "pom.xml"

    @property
    def libs(self) -> Path:
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()[:12]
        return self.root / "kafka" / f"libs-{digest}"

    @property
    def home(self) -> Path:
        """This node's folder: its config, data and format stamp."""
        return self.root / self.name

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    def port_settings(self) -> tuple[str, ...]:
        # The HA nodes have ports of their own, below Linux's ephemeral range (see
        # FLEETPULSE_HA_KAFKA_PORT): a killed node must be able to bind its port again.
        if self.ha:
            return ("ha_kafka_port", "ha_kafka_controller_port")
        return ("kafka_port", "kafka_controller_port")

    def controller_port(self, node: int | None = None) -> int:
        node = self.node if node is None else node
        if not node:
            return self.settings.kafka_controller_port
        return self.settings.ha_kafka_controller_port + 10 * (node - 1)

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
        if self.ha:
            voters = ",".join(f"{n}@127.0.0.1:{self.controller_port(n)}" for n in HA_NODES)
            quorum = f"controller.quorum.voters={voters}"
        else:
            quorum = f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port()}"
        replication = self.replication
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            template.format(
                node_id=self.node or 1,
                listen_host="127.0.0.1",
                advertised_host="127.0.0.1",
                kafka_port=self.port,
                controller_port=self.controller_port(),
                quorum=quorum,
                data_dir=self.data_dir,
                partitions=self.settings.kafka_partitions,
                replication=replication,
                min_isr=2 if replication >= 3 else 1,
                io_threads=2 if self.ha else 4,
            )
        )

    def _cluster_id(self) -> str:
        """A new Kafka cluster id alone; in HA the one all three nodes are formatted with."""
        path = self.root / "kafka-ha.cluster-id"
        if self.ha and path.exists():
            return path.read_text().strip()
        # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding; like
        # Kafka's Uuid.randomUuid(), never one starting with "-", which StorageTool's
        # argument parser would take for an option (1 run in 64 failed to format).
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if self.ha:
            path.write_text(cluster_id + "\n")
        return cluster_id

    def _format_storage(self) -> None:
        stamp = self.home / "formatted.json"
        wanted = {"controller_port": self.controller_port()}
        if (self.data_dir / "meta.properties").exists():
            if stamp.exists() and json.loads(stamp.read_text()) != wanted:
                raise StackError(
                    f"the Kafka data in {self.data_dir} was formatted for "
                    f"{json.loads(stamp.read_text())}, not {wanted}; set the old "
                    f"{env_name(self.port_settings()[1])} back, or run `just stack-reset`"
                )
            return
        # Alone: a dynamic quorum of this one controller (--standalone). HA: the static
        # quorum of controller.quorum.voters, the same on every node.
        quorum = [] if self.ha else ["--standalone"]
        subprocess.run(
            [
                self._java(),
                "-cp",
                f"{self.libs}/*",
                "kafka.tools.StorageTool",
                "format",
                *quorum,
                "--cluster-id",
                self._cluster_id(),
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
            f"-Xms{min(512, self.heap_mb)}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseG1GC",
            # 2 cores: a JVM would otherwise size its GC and compiler pools for more.
            "-XX:ParallelGCThreads=2",
            "-XX:CICompilerCount=2",
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
        # A node of the HA cluster is up once it is itself a registered, unfenced broker.
        return (self.node in meta.brokers) if self.ha else len(meta.brokers) >= 1

    def after_start(self) -> None:
        if self.ha:  # topics of 3 copies need all 3 brokers registered
            try:
                wait_for_brokers(
                    self._admin(), self.replication, self.settings.stack_start_timeout_s
                )
            except StackError as exc:
                raise StackError(f"{self.name}: {exc}; see `just stack-logs`") from exc
        ensure_topics(
            self._admin(),
            product_topics(self.settings),
            self.settings.kafka_partitions,
            self.replication,
            reports_topic=self.settings.topic_reports,
        )

    def role(self) -> str:
        if not self.ha:
            return ""
        try:
            meta = self._admin().list_topics(timeout=2)
        except Exception:
            return ""
        leads = sum(
            p.leader == self.node for t in meta.topics.values() for p in t.partitions.values()
        )
        total = sum(len(t.partitions) for t in meta.topics.values())
        controller = " active controller" if quorum_leader(self.root) == self.node else ""
        return f"leads {leads}/{total} partitions{controller}"


def quorum_leader(root: Path) -> int | None:
    """The HA cluster's active controller: the leader in the nodes' KRaft quorum-state
    files (the newest epoch any node has seen), or None if none is known yet."""
    best: tuple[int, int] | None = None  # (epoch, leader)
    for node in HA_NODES:
        path = root / f"kafka-{node}" / "data" / "__cluster_metadata-0" / "quorum-state"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        leader, epoch = state.get("leaderId", -1), state.get("leaderEpoch", -1)
        if leader >= 0 and (best is None or epoch > best[0]):
            best = (epoch, leader)
    return None if best is None else best[1]


# librdkafka logs connection refusals while the broker starts; health checks expect them.
_QUIET = logging.getLogger("fleetpulse.stack.kafka-probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def apt_install(package: str, binary: str, root: Path) -> None:
    """Install a Debian package when ``binary`` is not on PATH (first run only)."""
    if shutil.which(binary) is not None:
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise StackError(
            f"{binary} not found on PATH; install it (Debian: apt-get install {package})"
        )
    print(f"provisioning {binary}: apt-get install {package} (first run only)")
    log = root / "logs" / f"provision-{package}.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_with_progress([apt, "update"], "apt-get update", log, HERE, env)
    run_with_progress(
        [apt, "install", "-y", "--no-install-recommends", package],
        f"apt-get install {package}",
        log,
        HERE,
        env,
    )
    if shutil.which(binary) is None:
        raise StackError(f"apt-get installed {package} but {binary} is still not on PATH")


def _redis_client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


class Redis(Service):
    """Debian's redis-server (installed with apt-get when none is on PATH).

    Append-only file on: a restarted server has every write it acknowledged before
    the last fsync (once a second). In the HA stack this is the first master.
    """

    kind = "redis"
    port_setting = "redis_port"

    @property
    def data_dir(self) -> Path:
        return self.root / self.name

    def provision(self) -> None:
        apt_install("redis-server", "redis-server", self.root)

    def extra_args(self) -> list[str]:
        return []

    @property
    def users_path(self) -> Path:
        """The product's Redis users and passwords (JSON, mode 0600): shared by the nodes."""
        return self.root / "redis-users.json"

    def write_acl(self) -> Path:
        """The ACL file the server starts with: the product's writer and reader users
        (state.acl), and ``default`` left open for development (redis-cli, the tests)."""
        users = RedisUsers.kept(self.users_path)
        path = self.data_dir / "users.acl"
        path.touch(mode=0o600)
        path.write_text(acl_file(users.settings(self.settings), default="open"))
        return path

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--aclfile",
            str(self.write_acl()),
            *self.extra_args(),
        ]

    def healthy(self) -> bool:
        try:
            return bool(_redis_client(self.port).ping())
        except redis.RedisError:
            return False

    def role(self) -> str:
        try:
            info = _redis_client(self.port).info("replication")
        except redis.RedisError:
            return ""
        if info.get("role") == "master":
            return f"master, {info.get('connected_slaves', 0)} replica(s)"
        return f"replica of {info.get('master_host')}:{info.get('master_port')}"


class RedisReplica(Redis):
    """HA stack: a replica of the first master (port +1); Sentinel may promote it."""

    kind = "redis-replica"

    @property
    def port_offset(self) -> int:
        return 1

    def extra_args(self) -> list[str]:
        return ["--replicaof", "127.0.0.1", str(self.settings.redis_port)]


class Sentinel(Service):
    """HA stack: one of 3 Redis Sentinels (Debian's redis-sentinel), ports +10 + n.

    Each has its own writable config (Sentinel rewrites it with what it learns: the
    current master, the other Sentinels, the replicas). Quorum 2; down-after and
    failover timeouts from settings (5000 ms, the seed's, by default; tests use less).
    """

    kind = "sentinel"
    port_setting = "redis_port"

    @property
    def port_offset(self) -> int:
        return 10 + self.node

    @property
    def config_path(self) -> Path:
        return self.root / self.name / "sentinel.conf"

    def provision(self) -> None:
        apt_install("redis-sentinel", "redis-sentinel", self.root)
        # A fresh config at every start of the HA stack's Redis (its nodes start in
        # their first roles then); a Sentinel restarted alone keeps what it learned.
        if self.config_path.exists():
            return
        s, name = self.settings, self.settings.redis_sentinel_master
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"""port {self.port}
bind 127.0.0.1
daemonize no
logfile ""
dir {self.config_path.parent}
sentinel monitor {name} 127.0.0.1 {s.redis_port} 2
sentinel down-after-milliseconds {name} {s.sentinel_down_after_ms}
sentinel failover-timeout {name} {s.sentinel_failover_timeout_ms}
sentinel parallel-syncs {name} 1
"""
        )

    def command(self) -> list[str]:
        binary = shutil.which("redis-sentinel")
        assert binary is not None
        return [binary, str(self.config_path)]

    def _master(self) -> dict[str, Any] | None:
        try:
            client = _redis_client(self.port)
            state = client.sentinel_master(self.settings.redis_sentinel_master)
        except redis.RedisError:
            return None
        return state if isinstance(state, dict) else None

    def healthy(self) -> bool:
        # Ready for a failover: it sees the master, a replica and both other Sentinels.
        state = self._master()
        return (
            state is not None
            and int(state.get("num-other-sentinels", 0)) >= len(HA_NODES) - 1
            and int(state.get("num-slaves", 0)) >= 1
        )

    def role(self) -> str:
        state = self._master()
        if state is None:
            return ""
        return f"master is {state.get('ip')}:{state.get('port')}"


# How Jaeger is built, here and in its image (deploy/images/jaeger.Dockerfile): a static
# binary with trimmed paths, so the image's build stage, lent this machine's Go caches,
# finds every package already compiled.
JAEGER_BUILD_ENV = {"CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false -trimpath"}


class Jaeger(Service):
    """Jaeger v2 built from the Go module proxy; OTLP in, in-memory storage, query API out."""

    kind = "jaeger"
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
                env={**os.environ, **JAEGER_BUILD_ENV},
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
