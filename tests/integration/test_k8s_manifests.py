"""The Kubernetes manifests (deploy/k8s): every overlay and folder renders with kustomize
(the kubectl built here), hangs together (selectors, ports by name, probes, resources,
images, settings, monitors), and is accepted by the local API server in a strict
server-side dry run after the upstream CRDs of deploy/k8s/crds were applied for real, so
that custom resources are validated against their schemas as well as core objects are.
Phase 3 on Strimzi and phase 4 (canary, chaos, mirroring) are in test_k8s_phase4.py.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from deploy.containers import IMAGES
from deploy.local.cluster import Cluster, kubectl
from fleetpulse.errors import ConfigError, StackError
from fleetpulse.settings import Settings, env_name, load_settings
from tests.integration.k8s_util import (
    NAMESPACE,
    OVERLAYS,
    ROOTS,
    Doc,
    containers,
    crd_docs,
    env,
    of_kind,
    one,
    pods,
    render,
    selects,
    setting,
)

pytestmark = pytest.mark.timeout(1800)  # the first run builds Kubernetes (minutes)

BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_probed_limited_non_root_and_on_our_images(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    built = {i.ref for i in IMAGES}
    assert pods(docs)
    for workload, pod in pods(docs):
        name = f"{overlay}/{workload['kind']}/{workload['metadata']['name']}"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for c in containers(pod):
            assert c["image"] in built and c["imagePullPolicy"] == "Never", (name, c["image"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        if workload["kind"] != "Job":
            for c in pod["spec"]["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, (name, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_hpas_point_at_what_exists(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    templates = pods(docs)
    for svc in of_kind(docs, "Service"):
        targets = [
            p for _, p in templates if selects(svc["spec"]["selector"], p["metadata"]["labels"])
        ]
        assert targets, f"Service {svc['metadata']['name']} selects no pod"
        names = {
            port["name"] for p in targets for c in p["spec"]["containers"] for port in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selects(selector, p["metadata"]["labels"]) for _, p in templates), pdb
    workloads = {(w["kind"], w["metadata"]["name"]) for w, _ in templates}
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpas
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in workloads, hpa
    for workload, pod in templates:  # selectors select their own pods
        if workload["kind"] != "Job":
            assert selects(workload["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_in_the_manifests_are_settings_with_valid_values(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    for workload, pod in pods(docs):
        for c in pod["spec"]["containers"]:
            ours = {k: v for k, v in env(c, docs).items() if k.startswith("FLEETPULSE_")}
            try:
                load_settings(ours)
            except ConfigError as exc:
                pytest.fail(f"{overlay}/{workload['metadata']['name']}: {exc}")
        for mount in (m for c in containers(pod) for m in c.get("volumeMounts", [])):
            if mount["name"] == "config":  # hot reload follows the directory's ..data link
                assert "subPath" not in mount and mount["mountPath"] == "/etc/fleetpulse"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dataflow_cluster_and_kafka_agree_with_themselves(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    sts = {d["metadata"]["name"]: d for d in of_kind(docs, "StatefulSet")}
    flow = sts["dataflow"]["spec"]
    assert flow["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in flow["volumeClaimTemplates"]] == ["recovery"]
    (init,) = flow["template"]["spec"]["initContainers"]
    assert int(env(init, docs)["BYTEWAX_REPLICAS"]) == flow["replicas"]
    main = env(flow["template"]["spec"]["containers"][0], docs)
    assert main["BYTEWAX_STATEFULSET_NAME"] == "dataflow" == flow["serviceName"]
    assert main["FLEETPULSE_RECOVERY_PER_PROCESS"] == "true"
    if "kafka" not in sts:  # Kafka run by Strimzi: test_k8s_phase4.py checks that one
        assert of_kind(docs, "Kafka"), f"{overlay} has neither a Kafka StatefulSet nor a Kafka"
        return

    kafka = sts["kafka"]["spec"]
    kenv = env(kafka["template"]["spec"]["containers"][0], docs)
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


# --- monitoring ----------------------------------------------------------------------------


def _container_ports(pod: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_scrape_named_ports_of_services_and_pods_that_exist(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    templates = [p for _, p in pods(docs)]
    monitors = of_kind(docs, "ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == ["dashboard", "ingest", "query"]
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in of_kind(docs, "Service") if selects(wanted, s["metadata"]["labels"])]
        assert svc["metadata"]["name"] == monitor["metadata"]["name"]
        behind = [p for p in templates if selects(svc["spec"]["selector"], p["metadata"]["labels"])]
        assert behind
        service_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports, (monitor["metadata"]["name"], endpoint)
            target = service_ports[endpoint["port"]]["targetPort"]
            for pod in behind:  # the port the Service sends to is the one the pods annotate
                number = _container_ports(pod)[target]
                notes = pod["metadata"]["annotations"]
                assert notes["prometheus.io/port"] == str(number)
                assert notes["prometheus.io/path"] == endpoint["path"] == "/metrics"
    (flow,) = of_kind(docs, "PodMonitor")
    selected = [
        p
        for p in templates
        if selects(flow["spec"]["selector"]["matchLabels"], p["metadata"]["labels"])
    ]
    assert [p["metadata"]["labels"]["app.kubernetes.io/name"] for p in selected] == ["dataflow"]
    for endpoint in flow["spec"]["podMetricsEndpoints"]:
        number = _container_ports(selected[0])[endpoint["port"]]
        flow_env = env(selected[0]["spec"]["containers"][0], docs)
        assert number == int(flow_env[env_name("dataflow_metrics_port")])
        assert selected[0]["metadata"]["annotations"]["prometheus.io/port"] == str(number)
    for monitor in [*monitors, flow]:
        assert monitor["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_annotations_name_a_container_port(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    scraped = set()
    for workload, pod in pods(docs):
        notes = pod["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") != "true":
            continue
        scraped.add(pod["metadata"]["labels"]["app.kubernetes.io/name"])
        assert int(notes["prometheus.io/port"]) in _container_ports(pod).values(), workload
        assert notes["prometheus.io/path"] == "/metrics"
    assert scraped == {"ingest", "query", "dashboard", "dataflow", "notifier"}


# --- the API server ------------------------------------------------------------------------


def _dry_run(settings: Settings, objects: list[Doc]) -> list[Doc]:
    out = kubectl(
        settings, "apply", "--server-side", "--dry-run=server", "--validate=strict",
        "-o", "json", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )  # fmt: skip
    answer: Doc = json.loads(out)
    return answer["items"] if answer["kind"] == "List" else [answer]  # kubectl unwraps one


def _in_namespace(docs: list[Doc], ns: str) -> list[Doc]:
    objects = [d for d in docs if d["kind"] != "Namespace"]
    for doc in objects:
        doc["metadata"]["namespace"] = ns
    return objects


def test_every_custom_resource_has_its_crd_here(k8s: Cluster, settings: Settings) -> None:
    served = {
        (crd["spec"]["group"], v["name"], crd["spec"]["names"]["kind"])
        for crd in crd_docs()
        for v in crd["spec"]["versions"]
        if v["served"]
    }
    custom: set[tuple[str, str, str]] = set()
    for root in ROOTS:
        for doc in render(settings, root):
            group, _, version = doc["apiVersion"].rpartition("/")
            if group not in BUILTIN_GROUPS:
                custom.add((group, version, doc["kind"]))
    assert custom <= served, custom - served
    assert {kind for _, _, kind in custom} == {
        "ServiceMonitor", "PodMonitor", "Kafka", "KafkaNodePool", "KafkaTopic",
        "KafkaMirrorMaker2", "DestinationRule", "VirtualService", "PodChaos", "NetworkChaos",
        "Schedule",
    }  # fmt: skip


@pytest.mark.parametrize("root", ROOTS)
def test_the_api_server_accepts_every_object(k8s: Cluster, settings: Settings, root: str) -> None:
    docs = render(settings, root)
    # A namespace of its own per run; a dry run needs the namespace to exist.
    ns = f"fp-{root.replace('/', '-')}-{os.getpid()}"
    kubectl(settings, "create", "namespace", ns)
    try:
        objects = _in_namespace(docs, ns)
        applied = _dry_run(settings, objects)
        assert sorted((a["kind"], a["metadata"]["name"]) for a in applied) == sorted(
            (d["kind"], d["metadata"]["name"]) for d in objects
        )
        # And it does validate: a field the first object's kind does not have is refused.
        broken = setting(objects[0], ["fieldThatIsNot"], 1)
        with pytest.raises(StackError, match=r"fieldThatIsNot: field not declared in schema"):
            kubectl(
                settings, "apply", "--server-side", "--dry-run=server", "--validate=strict",
                "-f", "-", input=json.dumps(broken),
            )  # fmt: skip
    finally:
        kubectl(settings, "delete", "namespace", ns, "--wait=false")


# Custom resources that break their CRD's schema, each once: (root, kind, name, path,
# value, what the API server says).
BROKEN: list[tuple[str, str, str, list[str | int], Any, str]] = [
    ("strimzi", "KafkaNodePool", "dual", ["spec", "replicas"], -1,
     r"spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0"),
    ("strimzi", "KafkaTopic", "robot-reports", ["spec", "replicas"], 40000,
     r"spec.replicas in body should be less than or equal to 32767"),
    ("strimzi", "KafkaNodePool", "dual", ["spec", "roles", 0], "leader",
     r'spec.roles\[0\]: Unsupported value: "leader"'),
    ("strimzi", "Kafka", "fleetpulse", ["spec", "kafka", "listeners", 0, "port"], 80,
     r"spec.kafka.listeners\[0\].port in body should be greater than or equal to 9092"),
    ("chaos", "PodChaos", "kafka-broker-kill", ["spec", "mode"], "half",
     r'spec.mode: Unsupported value: "half"'),
    ("chaos", "NetworkChaos", "kafka-delay", ["spec", "delay", "latency"], "100",
     r"spec.delay.latency in body should match"),
    ("chaos", "Schedule", "kafka-broker-kill-every-15m", ["spec", "historyLimit"], 0,
     r"spec.historyLimit in body should be greater than or equal to 1"),
    ("mirror", "KafkaMirrorMaker2", "fleetpulse-migration", ["spec", "mirrors", 0, "source", "alias"], "ha cluster",
     r"spec.mirrors\[0\].source.alias in body should match"),
    ("overlays/ha", "PodMonitor", "dataflow", ["spec", "podMetricsEndpoints", 0, "interval"], "15 seconds",
     r"spec.podMetricsEndpoints\[0\].interval in body should match"),
    # Istio's CRDs carry CEL rules, which only the API server evaluates.
    ("overlays/canary", "VirtualService", "query", ["spec", "http", 0, "timeout"], "0s",
     r"spec.http\[0\].timeout: Invalid value: \"0s\": must be a valid duration greater than 1ms"),
    ("overlays/canary", "DestinationRule", "query", ["spec", "trafficPolicy", "outlierDetection", "interval"], "0s",
     r"spec.trafficPolicy.outlierDetection.interval: Invalid value: \"0s\": must be a valid duration"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("root", "kind", "name", "path", "value", "says"),
    BROKEN,
    ids=[f"{kind}-{path[-1]}" for _, kind, _, path, _, _ in BROKEN],
)
def test_a_custom_resource_breaking_its_schema_is_refused(
    k8s: Cluster,
    settings: Settings,
    root: str,
    kind: str,
    name: str,
    path: list[str | int],
    value: Any,
    says: str,
) -> None:
    good = one(render(settings, root), kind, name)
    good["metadata"]["namespace"] = "default"
    assert [a["kind"] for a in _dry_run(settings, [good])] == [kind]  # as it is, accepted
    bad = setting(good, path, value)
    with pytest.raises(StackError, match=says) as refused:
        _dry_run(settings, [bad])
    assert f'{kind} "{name}" is invalid' in str(refused.value)  # the server's words
