"""The local Kubernetes control plane (`just k8s-up`): etcd, kube-apiserver,
kube-controller-manager and kube-scheduler built here and run as local processes.

The API server is the real one: objects are stored in etcd, RBAC is on, and server-side
apply validates a custom resource against its CRD's schema (an upstream CRD from
deploy/k8s/crds), in a dry run and for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local import node
from deploy.local.cluster import Cluster, kube_version, kubectl
from deploy.local.stack import Stack
from fleetpulse.errors import StackError
from fleetpulse.settings import Settings

pytestmark = pytest.mark.timeout(1800)  # the first run builds Kubernetes (minutes)

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "crds"
NS = f"fleetpulse-cp-{os.getpid()}"  # a namespace of its own per run (deletion is slow)


@pytest.fixture(scope="module")
def cluster(settings: Settings) -> Iterator[Cluster]:
    cluster = Cluster(settings)
    cluster.up()
    kubectl(settings, "create", "namespace", NS, "--dry-run=client", "-o", "yaml")
    kubectl(settings, "apply", "--server-side", "-f", "-", input=_namespace())
    try:
        yield cluster
    finally:
        kubectl(settings, "delete", "namespace", NS, "--wait=false")


def _namespace() -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})


def _topic(name: str, partitions: int) -> str:
    return json.dumps(
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"partitions": partitions, "replicas": 3},
        }
    )


def test_the_control_plane_is_the_pinned_version_and_healthy(
    cluster: Cluster, settings: Settings
) -> None:
    version = json.loads(kubectl(settings, "version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == kube_version() == "v1.37.2"
    assert version["clientVersion"]["gitVersion"] == kube_version()
    rows = {row.name: row for row in cluster.status()}
    plane = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "volumes"}
    node_ = {"containerd", "kubelet", "kube-proxy", "coredns"}
    assert set(rows) == plane | (node_ if settings.k8s_node == "kubelet" else {"kwok"})
    assert all(row.healthy and row.pid for row in rows.values()), rows
    # The controller manager works: every namespace gets its default service account.
    deadline = time.monotonic() + 60
    while "default" not in kubectl(settings, "get", "serviceaccounts", "-n", NS, "-o", "name"):
        assert time.monotonic() < deadline, "no default service account after 60 s"
        time.sleep(0.5)


def test_objects_round_trip_through_etcd(cluster: Cluster, settings: Settings) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "fleetpulse-config", "namespace": NS},
        "data": {"fleetpulse.yaml": "offline_after_s: 15\n"},
    }
    kubectl(settings, "apply", "--server-side", "-f", "-", input=json.dumps(cm))
    got = json.loads(
        kubectl(settings, "get", "configmap", "fleetpulse-config", "-n", NS, "-o", "json")
    )
    assert got["data"] == cm["data"]


def test_a_custom_resource_is_validated_against_its_crd(
    cluster: Cluster, settings: Settings
) -> None:
    kubectl(settings, "apply", "--server-side", "-f", str(CRDS / "strimzi-043-Crd-kafkatopic.yaml"))
    kubectl(
        settings, "wait", "--for=condition=Established", "--timeout=60s",
        "crd/kafkatopics.kafka.strimzi.io",
    )  # fmt: skip
    good = _topic("reports", 12)
    kubectl(settings, "apply", "--server-side", "--dry-run=server", "-f", "-", input=good)
    kubectl(settings, "apply", "--server-side", "-f", "-", input=good)
    stored = json.loads(kubectl(settings, "get", "kafkatopic", "reports", "-n", NS, "-o", "json"))
    assert stored["spec"] == {"partitions": 12, "replicas": 3}

    bad = _topic("broken", 0)  # the CRD says partitions >= 1
    for dry_run in (["--dry-run=server"], []):
        with pytest.raises(
            StackError, match=r"spec.partitions.*should be greater than or equal to 1"
        ):
            kubectl(settings, "apply", "--server-side", *dry_run, "-f", "-", input=bad)
    names = kubectl(settings, "get", "kafkatopics", "-n", NS, "-o", "name").split()
    assert names == ["kafkatopic.kafka.strimzi.io/reports"]


def test_down_stops_only_the_cluster(cluster: Cluster, settings: Settings) -> None:
    stack = Stack(settings)
    before = {row.name: row.pid for row in stack.status()}
    record = json.loads((cluster.root / "k8s" / "node" / "machine-before.json").read_text())
    assert Path(f"/sys/class/net/{node.BRIDGE}").exists()  # what the node changes, before
    cluster.down()
    assert all(row.pid is None for row in cluster.status())
    assert {row.name: row.pid for row in stack.status()} == before  # the data stack runs on
    # ... and what k8s-down puts back: the recorded sysctls, no bridge, no kube-proxy
    # tables, no cgroups, nothing mounted under the cluster's folder, no folders made.
    for name, value in record["sysctls"].items():
        assert Path("/proc/sys", name.replace(".", "/")).read_text().strip() == value, name
    assert not Path(f"/sys/class/net/{node.BRIDGE}").exists()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "kube-proxy" not in tables
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{node.CGROUP_ROOT}"))
    home = str((cluster.root / "k8s").resolve())
    mounts = Path("/proc/self/mountinfo").read_text().split()
    assert not [m for m in mounts if m.startswith(home)]
    for folder in node.OUTSIDE:
        assert folder.exists() == (str(folder) in record["existed"]), folder
    assert not (cluster.root / "k8s" / "node" / "machine-before.json").exists()
    cluster.up()  # and back, with its data: the namespace is still there
    assert NS in kubectl(settings, "get", "namespaces", "-o", "name")
