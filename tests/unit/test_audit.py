"""The config audit (python -m deploy.audit): deploy/ passes, having looked at every place
settings are written; a broken fixture fails, each of its mistakes named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from deploy.audit import ROLE_NEEDS, audit, check_file_key, check_variable, main
from fleetpulse.settings import Settings, env_name

REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "tests" / "fixtures" / "audit-broken"


@pytest.fixture(autouse=True)
def _from_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the report names files relative to the working folder


def test_deploy_has_no_problems_and_every_kind_of_place_was_read() -> None:
    report = audit([REPO / "deploy"])
    assert report.problems == []
    checked = set(report.checked)
    expected = {
        # compose: a service's environment, and a ${FLEETPULSE_...:-default} in it
        ("deploy/docker-compose-local.yml", "service webhook-server", "FLEETPULSE_KAFKA_BOOTSTRAP"),
        ("deploy/docker-compose-local.yml", "service kafka", "FLEETPULSE_KAFKA_PORT"),
        ("deploy/docker-compose-local.yml", "service dataflow-0", "FLEETPULSE_RECOVERY_PER_PROCESS"),
        # Kubernetes: a ConfigMap, the hot-reload file, a Secret, a container's env
        ("deploy/k8s/base/config.yaml", "ConfigMap/fleetpulse-env", "FLEETPULSE_KAFKA_PARTITIONS"),
        ("deploy/k8s/base/config.yaml", "ConfigMap/fleetpulse-config", "fleetpulse.yaml: offline_after_s"),
        ("deploy/k8s/base/config.yaml", "Secret/fleetpulse-tokens", "FLEETPULSE_API_TOKENS"),
        ("deploy/k8s/base/dataflow.yaml", "StatefulSet/dataflow container dataflow", "FLEETPULSE_DATAFLOW_METRICS_PORT"),
        # a container's whole settings, what its role needs, an overlay's patch
        ("deploy/k8s/base/ingest.yaml", "Deployment/ingest container ingest", "(settings together)"),
        ("deploy/k8s/base/dataflow.yaml", "StatefulSet/dataflow container dataflow", "FLEETPULSE_METRICS_HOST"),
        ("deploy/k8s/overlays/ha/kustomization.yaml", "Kustomization patch 2 (ConfigMap/fleetpulse-env)", "FLEETPULSE_KAFKA_REPLICATION"),
        ("deploy/k8s/overlays/ha/kustomization.yaml", "Kustomization patch 2 (ConfigMap/fleetpulse-env)", "FLEETPULSE_SENTINEL_DOWN_AFTER_MS"),
    }  # fmt: skip
    assert expected <= checked, expected - checked
    # Only fleetpulse's variables are counted (Kafka's KAFKA_* or Bytewax's are not ours).
    assert all(
        k.startswith(("FLEETPULSE_", "fleetpulse.yaml", "(", "envFrom")) for _, _, k in checked
    )


def test_the_broken_fixture_fails_naming_each_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    report = audit([BROKEN])
    where = "tests/fixtures/audit-broken/"
    found = {(p.file.removeprefix(where), p.obj, p.key): p.problem for p in report.problems}
    assert set(found) == {
        ("not-yaml.yaml", "-", "-"),
        ("docker-compose.yml", "service api", "FLEETPULSE_WINDOW_S"),
        ("docker-compose.yml", "service api", "FLEETPULSE_REDIS_SENTINELS"),
        ("docker-compose.yml", "service api", "FLEETPULSE_QUERY_PROT"),
        ("k8s.yaml", "ConfigMap/broken-env", "FLEETPULSE_KAFKA_PARTITONS"),
        ("k8s.yaml", "ConfigMap/broken-env", "FLEETPULSE_LOG_LEVEL"),
        ("k8s.yaml", "ConfigMap/broken-env", "FLEETPULSE_KAFKA_REPLICATION"),
        ("k8s.yaml", "ConfigMap/broken-env", "fleetpulse_shards"),
        ("k8s.yaml", "ConfigMap/fleetpulse-config", "fleetpulse.yaml: ofline_after_s"),
        ("k8s.yaml", "ConfigMap/fleetpulse-config", "fleetpulse.yaml: window_s"),
        ("k8s.yaml", "ConfigMap/fleetpulse-config", "fleetpulse.yaml: FLEETPULSE_STUCK_AFTER"),
        ("k8s.yaml", "Secret/tokens", "FLEETPULSE_API_TOKEN"),
        ("k8s.yaml", "Deployment/query container query", "FLEETPULSE_QUERY_PORT"),
        ("k8s.yaml", "Deployment/ingest container ingest", "(settings together)"),
        ("k8s.yaml", "StatefulSet/dataflow container dataflow", "envFrom ConfigMap/fleetpulse-extra"),
        ("k8s.yaml", "Job/topics container topics", "FLEETPULSE_TRACE_SAMPLE_RATIO"),
        ("k8s.yaml", "Job/topics container topics", "FLEETPULSE_KAFKA_BOOTSTRAP"),
        ("kustomization.yaml", "Kustomization patch 1 (ConfigMap/fleetpulse-env)", "FLEETPULSE_SHARDS"),
        ("kustomization.yaml", "Kustomization patch 2 (Deployment/query)", "FLEETPULSE_TRACE_SAMPLE_RATIO"),
        ("kustomization.yaml", "configMapGenerator generated", "FLEETPULSE_HISTORY_LEN"),
    }  # fmt: skip
    assert found[("docker-compose.yml", "service api", "FLEETPULSE_QUERY_PROT")] == (
        "unknown setting (did you mean FLEETPULSE_QUERY_PORT?)"
    )
    assert "did you mean FLEETPULSE_KAFKA_PARTITIONS?" in found[("k8s.yaml", "ConfigMap/broken-env", "FLEETPULSE_KAFKA_PARTITONS")]  # fmt: skip
    assert "did you mean offline_after_s?" in found[("k8s.yaml", "ConfigMap/fleetpulse-config", "fleetpulse.yaml: ofline_after_s")]  # fmt: skip
    assert "expected one of DEBUG, ERROR, INFO, WARNING" in found[("k8s.yaml", "ConfigMap/broken-env", "FLEETPULSE_LOG_LEVEL")]  # fmt: skip
    assert "battery_ok_pct (25) must be above low_battery_pct (30)" in found[("k8s.yaml", "Deployment/ingest container ingest", "(settings together)")]  # fmt: skip
    assert "not set: topics needs it" in found[("k8s.yaml", "Job/topics container topics", "FLEETPULSE_KAFKA_BOOTSTRAP")]  # fmt: skip

    assert main([str(BROKEN)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(found) + 1
    assert out[-1].startswith(f"config audit: {len(found)} problem(s) in 4 file(s) (4 files, ")
    assert (
        "tests/fixtures/audit-broken/k8s.yaml: Deployment/query container query: "
        "FLEETPULSE_QUERY_PORT: '99999' is not allowed"
    ) in "\n".join(out)


def test_the_command_passes_on_deploy_and_refuses_a_missing_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("config audit: no problems (")
    assert main([str(tmp_path / "nowhere")]) == 2


def test_one_typo_in_a_copy_of_the_real_config_is_found(tmp_path: Path) -> None:
    shutil.copytree(REPO / "deploy" / "k8s" / "base", tmp_path / "base")
    config = tmp_path / "base" / "config.yaml"
    config.write_text(
        config.read_text().replace("FLEETPULSE_METRICS_HOST", "FLEETPULSE_METRIC_HOST")
    )
    problems = audit([tmp_path]).problems
    assert [(p.obj, p.key, p.problem) for p in problems if p.obj.startswith("ConfigMap")] == [
        ("ConfigMap/fleetpulse-env", "FLEETPULSE_METRIC_HOST", "unknown setting (did you mean FLEETPULSE_METRICS_HOST?)")
    ]  # fmt: skip
    # And the dataflow, which needs it, is told it is missing.
    assert [(p.obj, p.key) for p in problems if not p.obj.startswith("ConfigMap")] == [
        ("StatefulSet/dataflow container dataflow", "FLEETPULSE_METRICS_HOST")
    ]


def test_the_alert_rules_in_the_configmap_are_the_example_and_are_checked(tmp_path: Path) -> None:
    docs = yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / "config.yaml").read_text())
    config = next(d for d in docs if d["metadata"]["name"] == "fleetpulse-config")
    example = (REPO / "deploy" / "rules" / "example.yaml").read_text()
    assert config["data"]["rules.yaml"] == example  # one set of example rules
    shutil.copytree(REPO / "deploy" / "k8s" / "base", tmp_path / "base")
    path = tmp_path / "base" / "config.yaml"
    path.write_text(path.read_text().replace("for_s: 10", "for_s: ten"))
    problems = [p for p in audit([tmp_path]).problems if p.key == "rules.yaml"]
    assert [(p.obj, p.problem) for p in problems] == [
        (
            "ConfigMap/fleetpulse-config",
            "rule 'battery-critical' (rules[0]): for_s: Expected `float`, got `str`",
        )
    ]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("FLEETPULSE_KAFKA_PARTITIONS", "24", None),
        ("KAFKA_PORT", "whatever", None),  # not ours
        ("FLEETPULSE_KAFKA_PARTITIONS", "0", "'0' is not allowed"),
        ("FLEETPULSE_OFLINE_AFTER_S", "30", "did you mean FLEETPULSE_OFFLINE_AFTER_S?"),
        ("FLEETPULSE_NOTHING_LIKE_IT", "1", "unknown setting"),
        ("Fleetpulse_Log_Level", "INFO", "fleetpulse reads FLEETPULSE_LOG_LEVEL"),
    ],
)
def test_check_variable(name: str, value: str, says: str | None) -> None:
    problem = check_variable(name, value)
    assert problem is None if says is None else says in (problem or "")


def test_check_file_key() -> None:
    assert check_file_key("low_battery_pct", 15) is None
    assert "expected a number >= 0 and <= 100" in (check_file_key("low_battery_pct", 150) or "")
    assert check_file_key("FLEETPULSE_LOW_BATTERY_PCT", 15) == (
        "the file takes setting names: write low_battery_pct"
    )
    assert check_file_key("low_batery_pct", 15) == "unknown setting (did you mean low_battery_pct?)"


def test_what_roles_need_are_settings_defaulting_to_this_machine() -> None:
    defaults = Settings()
    for needs in ROLE_NEEDS.values():
        for name in needs:
            assert getattr(defaults, name) in (None, "127.0.0.1"), env_name(name)
