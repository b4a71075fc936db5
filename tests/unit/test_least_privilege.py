"""Credentials and TLS settings: their rules, the Kafka client configuration they make,
the Redis ACL file, and that no secret is shown."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from deploy.local.tls import make_server_cert
from fleetpulse.errors import ConfigError
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import SECRET_FIELDS, load_settings, shown
from state.acl import WRITER_COMMANDS, acl_file, main, reader_rules, writer_rules
from state.connect import READER, WRITER, _credentials, _sentinel_args, _sentinel_kwargs

REPO = Path(__file__).resolve().parents[2]


def test_plaintext_kafka_is_the_default_and_maps_to_librdkafka_keys() -> None:
    config = kafka_config(load_settings({"FLEETPULSE_KAFKA_BOOTSTRAP": "k:9092"}), acks="all")
    assert config == {
        "bootstrap.servers": "k:9092",
        "security.protocol": "plaintext",
        "acks": "all",
    }


def test_sasl_ssl_maps_to_every_key(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = load_settings(
        {
            "FLEETPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "FLEETPULSE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "FLEETPULSE_KAFKA_SASL_USERNAME": "flow",
            "FLEETPULSE_KAFKA_SASL_PASSWORD": "s3cret",
            "FLEETPULSE_KAFKA_CA_FILE": str(ca),
        }
    )
    assert kafka_config(s) == {
        "bootstrap.servers": "127.0.0.1:59092",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "flow",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(ca),
    }
    with pytest.raises(ValueError, match=r"sasl\.password"):
        kafka_config(s, **{"sasl.password": "other"})
    gone = load_settings({**_ssl(), "FLEETPULSE_KAFKA_CA_FILE": str(tmp_path / "none.pem")})
    with pytest.raises(ConfigError, match=r"FLEETPULSE_KAFKA_CA_FILE=.*no such file"):
        kafka_config(gone)


def _ssl() -> dict[str, str]:
    return {"FLEETPULSE_KAFKA_SECURITY_PROTOCOL": "SSL"}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {
                "FLEETPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "FLEETPULSE_KAFKA_SASL_MECHANISM": "PLAIN",
            },
            ["FLEETPULSE_KAFKA_SASL_USERNAME", "FLEETPULSE_KAFKA_SASL_PASSWORD"],
        ),
        (
            {"FLEETPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            ["FLEETPULSE_KAFKA_SASL_MECHANISM", "FLEETPULSE_KAFKA_SASL_USERNAME"],
        ),
        (
            {"FLEETPULSE_KAFKA_SASL_MECHANISM": "PLAIN"},
            ["FLEETPULSE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT", "not PLAINTEXT"],
        ),
        (
            {"FLEETPULSE_KAFKA_CA_FILE": "/ca.pem"},
            ["FLEETPULSE_KAFKA_CA_FILE applies only with", "SSL or SASL_SSL"],
        ),
        (
            {"FLEETPULSE_REDIS_CA_FILE": "/ca.pem"},
            ["FLEETPULSE_REDIS_CA_FILE is set but FLEETPULSE_REDIS_URL is not a rediss://"],
        ),
        (
            {"FLEETPULSE_KAFKA_SASL_MECHANISM": "GSSAPI"},
            ["FLEETPULSE_KAFKA_SASL_MECHANISM='GSSAPI' is not allowed", "SCRAM-SHA-512"],
        ),
        (
            {"FLEETPULSE_REDIS_API_USERNAME": "bad user"},
            ["FLEETPULSE_REDIS_API_USERNAME='bad user' is not allowed"],
        ),
    ],
)
def test_bad_combinations_name_the_variables(env: dict[str, str], named: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    for text in named:
        assert text in str(info.value)


def test_secrets_are_masked_and_redis_urls_lose_their_password() -> None:
    for field in ("redis_password", "redis_api_password", "redis_sentinel_password",
                  "kafka_sasl_password"):  # fmt: skip
        assert field in SECRET_FIELDS
        assert shown(field, "hunter2") == "(set)"
    assert shown("redis_url", "rediss://sink:hunter2@r:6380/0") == "'rediss://sink:***@r:6380/0'"
    assert shown("redis_url", "redis://:hunter2@r/0") == "'redis://:***@r/0'"
    assert shown("redis_url", "redis://r:6379/0") == "'redis://r:6379/0'"


def test_each_role_authenticates_as_its_own_user() -> None:
    base = {"FLEETPULSE_REDIS_URL": "redis://urluser:urlpw@r:1/0"}
    s = load_settings(base)
    assert _credentials(s, WRITER) == {} and _credentials(s, READER) == {}  # the URL's
    s = load_settings(
        {**base, "FLEETPULSE_REDIS_USERNAME": "sink", "FLEETPULSE_REDIS_PASSWORD": "a"}
    )
    assert _credentials(s, WRITER) == {"username": "sink", "password": "a"}
    assert _credentials(s, READER) == {"username": "sink", "password": "a"}  # the writer's
    s = load_settings(
        {
            **base,
            "FLEETPULSE_REDIS_USERNAME": "sink",
            "FLEETPULSE_REDIS_PASSWORD": "a",
            "FLEETPULSE_REDIS_API_USERNAME": "api",
            "FLEETPULSE_REDIS_API_PASSWORD": "b",
            "FLEETPULSE_REDIS_SENTINELS": "s1:26379",
            "FLEETPULSE_REDIS_SENTINEL_USERNAME": "watch",
            "FLEETPULSE_REDIS_SENTINEL_PASSWORD": "c",
        }
    )
    assert _credentials(s, READER) == {"username": "api", "password": "b"}
    nodes, node = _sentinel_args(s, READER)
    assert nodes == [("s1", 26379)]
    assert (node["username"], node["password"], node["db"]) == ("api", "b", 0)
    assert _sentinel_args(s, WRITER)[1]["username"] == "sink"
    assert _sentinel_kwargs(s)["username"] == "watch" and "ssl" not in _sentinel_kwargs(s)


def test_tls_through_sentinel_checks_certificates_with_the_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = load_settings(
        {
            "FLEETPULSE_REDIS_URL": "rediss://r:1/0",
            "FLEETPULSE_REDIS_SENTINELS": "s1:26379",
            "FLEETPULSE_REDIS_SENTINEL_TLS": "true",
            "FLEETPULSE_REDIS_CA_FILE": str(ca),
        }
    )
    node = _sentinel_args(s, WRITER)[1]
    assert (node["ssl"], node["ssl_ca_certs"], node["ssl_cert_reqs"]) == (True, str(ca), "required")
    sentinels = _sentinel_kwargs(s)
    assert (sentinels["ssl"], sentinels["ssl_ca_certs"]) == (True, str(ca))


def _acl_settings(**extra: str) -> dict[str, str]:
    return {
        "FLEETPULSE_REDIS_PREFIX": "fx",
        "FLEETPULSE_REDIS_USERNAME": "sink",
        "FLEETPULSE_REDIS_PASSWORD": "pw1",
        "FLEETPULSE_REDIS_API_USERNAME": "api",
        "FLEETPULSE_REDIS_API_PASSWORD": "pw2",
        **extra,
    }


def test_the_acl_file_holds_two_users_of_the_prefix_and_no_password() -> None:
    text = acl_file(load_settings(_acl_settings()))
    sink, api, default = text.splitlines()
    assert sink.startswith("user sink reset on #") and " ~fx:* resetchannels -@all +ping" in sink
    assert api.startswith("user api reset on #") and "+@read -@dangerous -keys -scan" in api
    assert default == "user default reset off"
    assert "pw1" not in text and "pw2" not in text
    for dangerous in ("flushall", "flushdb", "config", "keys", "debug", "acl", "shutdown"):
        assert f"+{dangerous}" not in sink and f"+{dangerous}" not in api
    assert writer_rules("fx")[0] == reader_rules("fx")[0] == "~fx:*"
    admin = acl_file(load_settings(_acl_settings()), admin_password="pw3")
    assert admin.splitlines()[-1].startswith("user default reset on #")
    assert "pw3" not in admin


def test_every_command_in_the_writers_scripts_is_allowed() -> None:
    from state import scripts

    called = set()
    for source in (scripts.BUMP, scripts.WINDOWS, scripts.ALERTS):
        called |= {c.lower() for c in re.findall(r"redis\.call\('(\w+)'", source)}
    assert called and called <= set(WRITER_COMMANDS)


def test_the_acl_file_needs_two_distinct_users(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FLEETPULSE_REDIS_API_USERNAME"):
        acl_file(
            load_settings({"FLEETPULSE_REDIS_USERNAME": "a", "FLEETPULSE_REDIS_PASSWORD": "b"})
        )
    with pytest.raises(ConfigError, match="two users"):
        acl_file(load_settings(_acl_settings(FLEETPULSE_REDIS_API_USERNAME="sink")))


def test_the_acl_command_writes_the_file_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in _acl_settings().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "users.acl"
    assert main([str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_text() == acl_file(load_settings(_acl_settings()))


def test_the_projects_ca_signs_a_server_certificate_for_the_names_given(tmp_path: Path) -> None:
    made = make_server_cert(tmp_path, "redis", ["DNS:redis.fleetpulse.svc"])
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(made.ca), str(made.cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK")
    names = subprocess.run(
        ["openssl", "x509", "-in", str(made.cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "IP Address:127.0.0.1" in names and "DNS:redis.fleetpulse.svc" in names
    for key in (made.key, tmp_path / "ca.key"):
        assert key.stat().st_mode & 0o777 == 0o600
    again = make_server_cert(tmp_path, "kafka")  # the same CA signs the next one
    assert again.ca == made.ca and again.ca.read_text() == made.ca.read_text()
