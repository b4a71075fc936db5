"""deploy/k8s/waxctl/values.yaml (the Bytewax Helm chart's values, for waxctl) says what
the ha overlay's dataflow StatefulSet says: image, processes, workers, recovery intervals,
metrics port, variables; and it passes the config audit (a broken copy does not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.audit import audit
from deploy.containers import IMAGES
from deploy.local.cluster import Cluster
from fleetpulse.settings import Settings, load_settings
from tests.integration.k8s_util import K8S, env, one, render

pytestmark = pytest.mark.timeout(1800)

VALUES_FILE = K8S / "waxctl" / "values.yaml"


def _values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(VALUES_FILE.read_text())
    return loaded


def test_the_values_run_what_the_ha_overlays_dataflow_runs(
    k8s: Cluster, settings: Settings
) -> None:
    values = _values()
    docs = render(settings, "overlays/ha")
    flow = one(docs, "StatefulSet", "dataflow")
    pod = flow["spec"]["template"]
    main = pod["spec"]["containers"][0]
    variables = env(main, docs)
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    assert image == main["image"] == next(i.ref for i in IMAGES if i.name == "fleetpulse")
    assert values["image"]["pullPolicy"] == main["imagePullPolicy"]
    conf = values["configuration"]
    assert conf["processesCount"] == flow["spec"]["replicas"] == 2
    assert str(conf["workersPerProcess"]) == variables["BYTEWAX_WORKERS_PER_PROCESS"]
    recovery = conf["recovery"]
    assert recovery["enabled"] is True
    assert str(recovery["snapshotInterval"]) == variables["BYTEWAX_SNAPSHOT_INTERVAL"]
    assert str(recovery["backupInterval"]) == variables["BYTEWAX_RECOVERY_BACKUP_INTERVAL"]
    (claim,) = flow["spec"]["volumeClaimTemplates"]
    assert recovery["persistence"]["size"] == claim["spec"]["resources"]["requests"]["storage"]
    assert recovery["persistence"]["accessModes"] == claim["spec"]["accessModes"]
    ours = {k: v for k, v in variables.items() if k.startswith("FLEETPULSE_")}
    assert {k: str(v) for k, v in values["env"].items()} == ours
    assert recovery["partsCount"] == load_settings(ours).recovery_partitions
    peer = next(p for p in main["ports"] if p["name"] == "peer")
    assert values["service"]["port"] == peer["containerPort"]
    assert values["podAnnotations"] == pod["metadata"]["annotations"]
    assert values["resources"] == main["resources"]
    assert values["podSecurityContext"] == pod["spec"]["securityContext"]
    assert values["customOtlpUrl"] == ours["FLEETPULSE_OTLP_ENDPOINT"]
    # The ConfigMap the chart mounts as its "python files", and the hot-reload one, exist.
    assert conf["configMap"]["create"] is False
    one(docs, "ConfigMap", conf["configMap"]["customName"])
    (mount,) = values["extraSecretMounts"]
    assert mount["mountPath"] == ours["FLEETPULSE_CONFIG_DIR"] and "subPath" not in mount
    for source in mount["projected"]["sources"]:
        one(docs, "ConfigMap", source["configMap"]["name"])


def test_the_values_pass_the_config_audit_and_a_typo_does_not(tmp_path: Path) -> None:
    report = audit([VALUES_FILE])
    assert report.problems == []
    assert {k for _, _, k in report.checked} >= {
        "FLEETPULSE_REDIS_SENTINELS",
        "(settings together)",
    }
    broken = tmp_path / "values.yaml"
    text = VALUES_FILE.read_text().replace(
        "FLEETPULSE_KAFKA_BOOTSTRAP", "FLEETPULSE_KAFKA_BOOTSTRP"
    )
    broken.write_text(text)
    problems = audit([broken]).problems
    keys = {p.key for p in problems}
    assert "FLEETPULSE_KAFKA_BOOTSTRP" in keys  # unknown, with a did-you-mean
    assert "FLEETPULSE_KAFKA_BOOTSTRAP" in keys  # and the dataflow's address is missing
