"""The images and the compose file agree with each other and with the settings (no podman)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from deploy.containers import (
    COMPOSE_FILE,
    IMAGES,
    IMAGES_DIR,
    ROOT,
    Compose,
    _redis_users,
    compose_environ,
    debian_base_ref,
    python_base_ref,
)
from fleetpulse.settings import Settings, env_name
from state.acl import RedisUsers

SPEC: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = SPEC["services"]
SETTING_NAMES = {env_name(n) for n in Settings.__struct_fields__}


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9_.-]+)==(\S+)", path.read_text(), re.MULTILINE))


def test_every_image_the_compose_file_runs_is_one_the_project_builds() -> None:
    built = {i.ref for i in IMAGES}
    used = {spec["image"] for spec in SERVICES.values()}
    assert used == built
    for spec in SERVICES.values():
        image = next(i for i in IMAGES if i.ref == spec["image"])
        assert spec["build"]["dockerfile"] == f"deploy/images/{image.dockerfile}"
        assert (COMPOSE_FILE.parent / spec["build"]["context"]).resolve() == ROOT


def test_every_fleetpulse_variable_in_the_compose_file_is_a_setting() -> None:
    # Interpolated names and the environment of the containers alike: an unknown
    # FLEETPULSE_* name would be refused by the settings loader at start.
    text = COMPOSE_FILE.read_text()
    named = set(re.findall(r"\b(FLEETPULSE_[A-Z0-9_]+)", text))
    assert named and named <= SETTING_NAMES, named - SETTING_NAMES


def test_the_seed_ports_are_the_defaults() -> None:
    text = COMPOSE_FILE.read_text()
    for var, port in (
        ("FLEETPULSE_KAFKA_PORT", 59092),
        ("FLEETPULSE_REDIS_PORT", 56379),
        ("FLEETPULSE_QUERY_PORT", 58080),
        ("FLEETPULSE_INGEST_PORT", 58081),
    ):
        defaults = set(re.findall(rf"\${{{var}:-(\d+)}}", text))
        assert defaults == {str(port)}, var


def test_services_wait_for_what_they_need_and_are_health_checked() -> None:
    for name, spec in SERVICES.items():
        assert spec["network_mode"] == "host", name
        if name not in ("topics", "sim"):
            assert "healthcheck" in spec, name
    assert SERVICES["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in ("webhook-server", "dataflow-0", "dataflow-1"):
        needs = SERVICES[name]["depends_on"]
        assert needs["topics"] == {"condition": "service_completed_successfully"}, name
    assert SERVICES["api-server"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    board = SERVICES["dashboard"]
    assert board["command"] == ["dashboard"]
    assert board["depends_on"]["redis"] == {"condition": "service_healthy"}
    # Its pipeline panel reads the ingest server and both dataflow processes.
    assert board["environment"]["FLEETPULSE_DASHBOARD_METRICS"].split(",") == [
        "http://127.0.0.1:${FLEETPULSE_INGEST_PORT:-58081}/metrics",
        "http://127.0.0.1:${FLEETPULSE_DATAFLOW_METRICS_PORT:-9464}/metrics",
        "http://127.0.0.1:${DATAFLOW_METRICS_PORT_1:-9465}/metrics",
    ]


def test_the_dataflow_is_two_processes_of_one_cluster_with_a_volume_each() -> None:
    commands = [SERVICES[f"dataflow-{i}"]["command"] for i in (0, 1)]
    assert [c[c.index("-i") + 1] for c in commands] == ["0", "1"]
    addresses = {c[c.index("-a") + 1] for c in commands}
    assert len(addresses) == 1 and addresses.pop().count(";") == 1
    volumes = [SERVICES[f"dataflow-{i}"]["volumes"] for i in (0, 1)]
    rules = "./rules/example.yaml:/etc/fleetpulse/rules.yaml:ro"
    assert volumes == [
        ["recovery-0:/var/lib/fleetpulse/recovery", rules],
        ["recovery-1:/var/lib/fleetpulse/recovery", rules],
    ]
    for i in (0, 1):
        env = SERVICES[f"dataflow-{i}"]["environment"]
        assert env["FLEETPULSE_RECOVERY_PER_PROCESS"] == "true"
    assert set(SPEC["volumes"]) == {"kafka-data", "redis-data", "recovery-0", "recovery-1"}


def test_the_rules_file_reaches_the_flow_ingest_and_the_notifier() -> None:
    rules = "./rules/example.yaml:/etc/fleetpulse/rules.yaml:ro"
    for name in ("dataflow-0", "dataflow-1", "webhook-server", "notifier"):
        spec = SERVICES[name]
        assert rules in spec["volumes"], name
        assert spec["environment"]["FLEETPULSE_RULES_FILE"] == "/etc/fleetpulse/rules.yaml"
    assert SERVICES["notifier"]["command"] == ["notify"]
    assert SERVICES["notifier"]["healthcheck"]["test"] == ["CMD", "fleetpulse-health", "notify"]
    assert "FLEETPULSE_NOTIFY_SECRETS" in SERVICES["notifier"]["environment"]
    assert (ROOT / "deploy" / "rules" / "example.yaml").is_file()


def test_start_order_follows_depends_on(settings: Settings) -> None:
    levels = Compose(settings).order()
    assert levels[0] == ["jaeger", "kafka", "redis"]
    assert levels[1] == ["api-server", "dashboard", "topics"]
    assert set(levels[2]) == {"dataflow-0", "dataflow-1", "webhook-server", "notifier"}
    assert "sim" not in {s for level in levels for s in level}  # profile "sim" only
    with_sim = Compose(settings, profiles=("sim",)).order()
    assert with_sim[-1] == ["sim"]


def test_compose_environ_carries_the_ports_and_only_token_hashes(settings: Settings) -> None:
    tokens = {"read": "fp_r", "ingest": "fp_i", "admin": "fp_a"}
    environ = compose_environ(settings, tokens)
    assert environ["FLEETPULSE_KAFKA_PORT"] == str(settings.kafka_port)
    entries = environ["FLEETPULSE_API_TOKENS"].split(",")
    assert [e.split(":")[0] for e in entries] == ["read", "ingest", "admin"]
    assert not any(t in environ["FLEETPULSE_API_TOKENS"] for t in tokens.values())


def test_dockerfiles_are_slim_non_root_health_checked_and_take_a_base() -> None:
    for image in IMAGES:
        text = (IMAGES_DIR / image.dockerfile).read_text()
        assert re.search(r"^ARG BASE=\S+", text, re.MULTILINE), image.name
        assert "HEALTHCHECK" in text, image.name
        final = text[text.rindex("\nFROM ") :]  # the last stage is the image
        user = re.search(r"^USER (\S+)", final, re.MULTILINE)
        assert user and user.group(1) not in ("root", "0", "0:0"), image.name
        assert "maven" not in final and "golang" not in final, image.name
        assert "rm -rf /var/lib/apt/lists/*" in text or "apt-get" not in final, image.name


def test_the_images_runtime_lock_pins_what_the_dev_lock_pins() -> None:
    runtime = _pins(IMAGES_DIR / "requirements.lock")
    everything = _pins(ROOT / "requirements.lock")
    assert runtime.keys() <= everything.keys()
    assert {n: v for n, v in runtime.items() if everything[n] != v} == {}
    assert "bytewax" in runtime and "pytest" not in runtime and "podman-compose" not in runtime


def test_the_build_context_leaves_out_local_state() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"  # an allow-list: nothing unless named
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ".stack" not in allowed and ".venv" not in allowed
    copied = set()
    for image in IMAGES:
        text = (IMAGES_DIR / image.dockerfile).read_text()
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
            copied |= set(src.split())
    for src in copied:
        assert any(src == a or src.startswith(a + "/") for a in allowed), src


@pytest.mark.parametrize("ref", [debian_base_ref(), python_base_ref()])
def test_base_tags_are_hashes_of_their_recipe(ref: str) -> None:
    assert re.fullmatch(r"localhost/fleetpulse-base/\w+:[\w.-]+-[0-9a-f]{12}", ref)


def test_an_image_the_project_does_not_build_is_named_with_the_ones_it_does(
    settings: Settings,
) -> None:
    from deploy.containers import build_images
    from fleetpulse.errors import StackError

    with pytest.raises(
        StackError, match=r"no image nope; the images: fleetpulse, fleetpulse-kafka"
    ):
        build_images(settings, ["nope"])


def test_topics_cli_refuses_a_bad_setting_before_touching_kafka(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetpulse import topics

    monkeypatch.setenv("FLEETPULSE_KAFKA_PARTITIONS", "many")
    assert topics.main([]) == 2
    assert "FLEETPULSE_KAFKA_PARTITIONS" in capsys.readouterr().err


def test_redis_users_of_least_privilege_reach_only_their_services(
    settings: Settings, tmp_path: Path
) -> None:
    redis = SERVICES["redis"]
    assert redis["command"] == ["--aclfile", "/etc/fleetpulse/users.acl"]
    assert "${REDIS_ACL_FILE:-./redis/users.acl}:/etc/fleetpulse/users.acl:ro" in redis["volumes"]
    writer = {"FLEETPULSE_REDIS_USERNAME": "fleetpulse-sink",
              "FLEETPULSE_REDIS_PASSWORD": "${FLEETPULSE_REDIS_PASSWORD:-}"}  # fmt: skip
    reader = {"FLEETPULSE_REDIS_API_USERNAME": "fleetpulse-api",
              "FLEETPULSE_REDIS_API_PASSWORD": "${FLEETPULSE_REDIS_API_PASSWORD:-}"}  # fmt: skip
    for name, spec in SERVICES.items():
        env = spec.get("environment", {})
        holds = {k: v for k, v in env.items() if k in writer or k in reader}
        if name.startswith("dataflow-"):
            assert holds == writer, name
        elif name in ("api-server", "dashboard"):
            assert holds == reader, name
        else:  # ingest, topics, sim, the services: no Redis password at all
            assert holds == {}, name
    users = RedisUsers("fleetpulse-sink", "pw-w", "fleetpulse-api", "pw-r")
    environ = compose_environ(settings, {"read": "r", "ingest": "i", "admin": "a"}, users)
    assert environ["FLEETPULSE_REDIS_PASSWORD"] == "pw-w"
    assert environ["FLEETPULSE_REDIS_API_PASSWORD"] == "pw-r"
    assert environ["REDIS_ACL_FILE"].endswith("/containers/fleetpulse.users.acl")


def test_compose_up_makes_the_users_once_and_an_acl_file_without_passwords(
    settings: Settings, tmp_path: Path
) -> None:
    s = msgspec.structs.replace(settings, stack_dir=str(tmp_path))
    users = _redis_users(s, "fleetpulse")
    assert _redis_users(s, "fleetpulse") == users  # kept
    kept = tmp_path / "containers" / "fleetpulse.redis-users.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    text = (tmp_path / "containers" / "fleetpulse.users.acl").read_text()
    assert users.writer_password not in text and users.reader_password not in text
    assert text.splitlines()[-1] == "user default reset on nopass resetchannels -@all +ping"
    assert [line.split()[1] for line in text.splitlines()] == [
        "fleetpulse-sink",
        "fleetpulse-api",
        "default",
    ]
