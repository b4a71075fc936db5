"""Kafka over SASL_SSL with the project's CA: a test-owned broker (the local stack's jars,
a tmp folder, free ports; the shared broker is untouched) whose only client listener is
SASL_SSL (PLAIN), its certificate signed by deploy.local.tls's CA. The product's own
clients, configured by settings alone (fleetpulse.kafka_config), create the topics,
acknowledge a posted report (ingest: 202 = durable) and read it back; a wrong password
or a missing CA is refused."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from litestar.testing import TestClient

from api.app import create_app
from api.auth import hash_token, new_token
from deploy.local.procs import free_port
from deploy.local.services import Kafka
from deploy.local.stack import Stack
from deploy.local.tls import make_server_cert
from fleetpulse.errors import ConfigError
from fleetpulse.kafka_config import kafka_config
from fleetpulse.schema import decode_report
from fleetpulse.settings import Settings, load_settings
from fleetpulse.topics import ensure_topics, product_topics
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import report

pytestmark = pytest.mark.integration

INGEST = new_token()
PASSWORD = "kafka-" + uuid.uuid4().hex


@dataclass
class SecureKafka:
    port: int
    ca: Path

    def settings(self, **overrides: str) -> Settings:
        env = {
            "FLEETPULSE_KAFKA_BOOTSTRAP": f"localhost:{self.port}",
            "FLEETPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "FLEETPULSE_KAFKA_SASL_MECHANISM": "PLAIN",
            "FLEETPULSE_KAFKA_SASL_USERNAME": "fleetpulse",
            "FLEETPULSE_KAFKA_SASL_PASSWORD": PASSWORD,
            "FLEETPULSE_KAFKA_CA_FILE": str(self.ca),
            "FLEETPULSE_KAFKA_PARTITIONS": "2",
            "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(INGEST)}",
            **overrides,
        }
        return load_settings(env)


def _properties(root: Path, port: int, controller: int, keystore: Path) -> str:
    jaas = (
        'org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" '
        f'password="broker-pw" user_broker="broker-pw" user_fleetpulse="{PASSWORD}";'
    )
    return f"""process.roles=broker,controller
node.id=1
listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=SASL_SSL://localhost:{port}
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=PLAIN
sasl.mechanism.inter.broker.protocol=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config={jaas}
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={root / "tls" / "ca.pem"}
ssl.endpoint.identification.algorithm=https
log.dirs={root / "data"}
num.partitions=2
auto.create.topics.enable=false
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=2
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=1
num.io.threads=2
"""


@pytest.fixture(scope="module")
def secure_kafka(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    root = tmp_path_factory.mktemp("kafka-sasl-ssl")
    made = make_server_cert(root / "tls", "kafka")
    keystore = root / "tls" / "kafka-keystore.pem"  # Kafka's PEM keystore: key, then chain
    keystore.write_text(made.key.read_text() + made.cert.read_text())
    keystore.chmod(0o600)
    shared = next(s for s in stack.services if isinstance(s, Kafka))  # its jars and java
    port, controller = free_port(), free_port()
    config = root / "server.properties"
    config.write_text(_properties(root, port, controller, keystore))
    java = shared._java()
    classpath = f"{shared.libs}/*"
    subprocess.run(
        [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
         "--cluster-id", "c2VjdXJlLWthZmthLXRlc3Q", "--config", str(config)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    log = (root / "kafka.log").open("wb")
    proc = subprocess.Popen(
        [java, "-Xms256m", "-Xmx384m", "-XX:+UseG1GC", "-XX:ParallelGCThreads=1",
         "-XX:CICompilerCount=2", "-cp", classpath, "kafka.Kafka", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = SecureKafka(port, made.ca)
    try:
        admin = AdminClient(kafka_config(server.settings(), **{"socket.timeout.ms": 2000}))
        deadline = time.monotonic() + 120
        while True:
            try:
                if admin.list_topics(timeout=2).brokers:
                    break
            except KafkaException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "kafka.log").read_text()[-2000:]
                pytest.fail(f"the test's SASL_SSL broker did not start:\n{tail}", pytrace=False)
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_the_products_clients_work_over_sasl_ssl_from_settings_alone(
    secure_kafka: SecureKafka,
) -> None:
    s = secure_kafka.settings(FLEETPULSE_TOPIC_REPORTS=f"sec.{uuid.uuid4().hex[:8]}")
    admin = AdminClient(kafka_config(s))
    ensure_topics(admin, product_topics(s), 2, 1, reports_topic=s.topic_reports)
    assert s.topic_reports in admin.list_topics(timeout=10).topics
    with TestClient(create_app(s, query=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {INGEST}"
        assert client.get("/readyz").status_code == 200
        r = client.post("/v1/reports", json=report("amr-tls", seq=3))
        assert r.status_code == 202, r.text  # acknowledged by the SASL_SSL broker
    (msg,) = consume_all(s, s.topic_reports, expect=1)
    got = decode_report(msg.value())
    assert (msg.key(), got.robot_id, got.seq) == (b"amr-tls", "amr-tls", 3)


def _refused(s: Settings) -> list[KafkaError]:
    """The errors librdkafka reports (error_cb) while the cluster cannot be described."""
    errors: list[KafkaError] = []
    admin = AdminClient(kafka_config(s, **{"socket.timeout.ms": 2000, "error_cb": errors.append}))
    with pytest.raises(KafkaException):
        admin.describe_cluster(request_timeout=4).result(6)
    admin.poll(0.5)
    return errors


def test_a_wrong_password_or_no_ca_is_refused(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    wrong = _refused(secure_kafka.settings(FLEETPULSE_KAFKA_SASL_PASSWORD="x"))
    assert KafkaError._AUTHENTICATION in {e.code() for e in wrong}, wrong
    assert any("Invalid username or password" in e.str() for e in wrong)
    # Without the project's CA the broker's certificate is not trusted.
    no_ca = _refused(secure_kafka.settings(FLEETPULSE_KAFKA_CA_FILE=""))
    assert any("certificate verify failed" in e.str() for e in no_ca), no_ca
    gone = secure_kafka.settings(FLEETPULSE_KAFKA_CA_FILE=str(tmp_path / "none.pem"))
    with pytest.raises(ConfigError, match="FLEETPULSE_KAFKA_CA_FILE"):
        kafka_config(gone)
    # And a client that speaks PLAINTEXT gets no answer.
    plaintext = msgspec.structs.replace(
        secure_kafka.settings(),
        kafka_security_protocol="PLAINTEXT",
        kafka_sasl_mechanism="",
        kafka_sasl_username="",
        kafka_sasl_password="",
        kafka_ca_file="",
    )
    assert _refused(plaintext)
