"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize (the
kubectl built here), hangs together (selectors, ports by name, probes, resources,
images, settings), and is accepted by the local API server in a server-side dry run,
which validates every object against the real schemas of this Kubernetes version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.containers import IMAGES
from deploy.local.cluster import Cluster, kubectl
from fleetpulse.errors import ConfigError, StackError
from fleetpulse.settings import Settings, env_name, load_settings

pytestmark = pytest.mark.timeout(1800)  # the first run builds Kubernetes (minutes)

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
WORKLOADS = ("Deployment", "StatefulSet", "Job")


@pytest.fixture(scope="module")
def cluster(settings: Settings) -> Iterator[Cluster]:
    cluster = Cluster(settings)
    cluster.up()
    yield cluster


def render(settings: Settings, overlay: str) -> list[dict[str, Any]]:
    out = kubectl(settings, "kustomize", str(K8S / "overlays" / overlay))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _pods(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every workload."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in WORKLOADS]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's plain variables, with those of the ConfigMaps it takes whole."""
    env: dict[str, str] = {}
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_probed_limited_non_root_and_on_our_images(
    cluster: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, overlay)
    built = {i.ref for i in IMAGES}
    assert _pods(docs)
    for workload, pod in _pods(docs):
        name = f"{overlay}/{workload['kind']}/{workload['metadata']['name']}"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for c in _containers(pod):
            assert c["image"] in built and c["imagePullPolicy"] == "Never", (name, c["image"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        if workload["kind"] != "Job":
            for c in pod["spec"]["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, (name, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_hpas_point_at_what_exists(
    cluster: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, overlay)
    pods = _pods(docs)
    for svc in (d for d in docs if d["kind"] == "Service"):
        targets = [p for _, p in pods if _selects(svc["spec"]["selector"], p["metadata"]["labels"])]
        assert targets, f"Service {svc['metadata']['name']} selects no pod"
        names = {
            port["name"] for p in targets for c in p["spec"]["containers"] for port in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(_selects(selector, p["metadata"]["labels"]) for _, p in pods), pdb
    workloads = {(w["kind"], w["metadata"]["name"]) for w, _ in pods}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in workloads, hpa
    for workload, pod in pods:  # selectors select their own pods
        if workload["kind"] != "Job":
            assert _selects(workload["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_in_the_manifests_are_settings_with_valid_values(
    cluster: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, overlay)
    for workload, pod in _pods(docs):
        for c in pod["spec"]["containers"]:
            env = _env(c, docs)
            ours = {k: v for k, v in env.items() if k.startswith("FLEETPULSE_")}
            try:
                load_settings(ours)
            except ConfigError as exc:
                pytest.fail(f"{overlay}/{workload['metadata']['name']}: {exc}")
        for mount in (m for c in _containers(pod) for m in c.get("volumeMounts", [])):
            if mount["name"] == "config":  # hot reload follows the directory's ..data link
                assert "subPath" not in mount and mount["mountPath"] == "/etc/fleetpulse"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dataflow_cluster_and_kafka_agree_with_themselves(
    cluster: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, overlay)
    sts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    flow = sts["dataflow"]["spec"]
    assert flow["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in flow["volumeClaimTemplates"]] == ["recovery"]
    (init,) = flow["template"]["spec"]["initContainers"]
    assert int(_env(init, docs)["BYTEWAX_REPLICAS"]) == flow["replicas"]
    main = _env(flow["template"]["spec"]["containers"][0], docs)
    assert main["BYTEWAX_STATEFULSET_NAME"] == "dataflow" == flow["serviceName"]
    assert main["FLEETPULSE_RECOVERY_PER_PROCESS"] == "true"

    kafka = sts["kafka"]["spec"]
    kenv = _env(kafka["template"]["spec"]["containers"][0], docs)
    replicas = kafka["replicas"]
    rf = int(kenv["KAFKA_REPLICATION"])
    assert rf <= replicas and rf == int(main[env_name("kafka_replication")])
    min_isr = 2 if rf >= 3 else 1  # what the image and fleetpulse.topics set
    assert rf == 1 or rf >= min_isr + 1
    bootstrap = main[env_name("kafka_bootstrap")].split(",")
    assert bootstrap == [f"kafka-{i}.kafka:9092" for i in range(len(bootstrap))]
    if replicas > 1:
        voters = kenv["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert voters == [f"{i + 1}@kafka-{i}.kafka:9093" for i in range(replicas)]
        assert len(bootstrap) == replicas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_server_accepts_every_object(
    cluster: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, overlay)
    # A namespace of its own per run; a dry run needs the namespace to exist.
    ns = f"fp-{overlay}-{os.getpid()}"
    kubectl(settings, "create", "namespace", ns)
    try:
        for doc in docs:
            if doc["kind"] == "Namespace":
                continue
            doc["metadata"]["namespace"] = ns
        objects = [d for d in docs if d["kind"] != "Namespace"]
        out = kubectl(
            settings, "apply", "--server-side", "--dry-run=server", "--validate=strict",
            "-o", "json", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )  # fmt: skip
        applied = json.loads(out)["items"]
        assert sorted((a["kind"], a["metadata"]["name"]) for a in applied) == sorted(
            (d["kind"], d["metadata"]["name"]) for d in objects
        )
        # And it does validate: an unknown field in a pod spec is refused.
        broken = json.loads(json.dumps(next(d for d in objects if d["kind"] == "Deployment")))
        broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
        with pytest.raises(StackError, match="imagePullPolicyy"):
            kubectl(
                settings, "apply", "--server-side", "--dry-run=server", "--validate=strict",
                "-f", "-", input=json.dumps(broken),
            )  # fmt: skip
    finally:
        kubectl(settings, "delete", "namespace", ns, "--wait=false")
