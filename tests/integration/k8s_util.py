"""Helpers of the Kubernetes manifest tests: what deploy/k8s holds, rendered with the
kubectl built here, and small readers of the rendered objects."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from deploy.containers import IMAGES
from deploy.local.cluster import kubectl
from fleetpulse.settings import ENV_PREFIX, Settings, load_settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
CRDS = K8S / "crds"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
# Kustomizations beside the overlays (the Strimzi cluster, the chaos experiments, the
# mirror); components/ are only built inside an overlay, base/ is in every overlay.
FOLDERS = sorted(
    p.name for p in K8S.iterdir() if (p / "kustomization.yaml").exists() and p.name != "base"
)
ROOTS = [f"overlays/{o}" for o in OVERLAYS] + FOLDERS
WORKLOADS = ("Deployment", "StatefulSet", "Job")
NAMESPACE = "fleetpulse"

Doc = dict[str, Any]


@cache
def _rendered(settings: Settings, root: str) -> str:
    out = kubectl(settings, "kustomize", str(K8S / root))
    return json.dumps([doc for doc in yaml.safe_load_all(out) if doc])


def render(settings: Settings, root: str) -> list[Doc]:
    """The objects of one kustomization (a fresh copy each call: tests may change it)."""
    docs: list[Doc] = json.loads(_rendered(settings, root))
    return docs


def crd_docs() -> list[Doc]:
    """Every CustomResourceDefinition kept in deploy/k8s/crds."""
    return [
        d
        for f in sorted(CRDS.glob("*.yaml"))
        for d in yaml.load_all(f.read_text(), Loader=yaml.CSafeLoader)
        if d
    ]


def apply_crds(settings: Settings) -> list[str]:
    """Apply (for real, server-side) every CRD of deploy/k8s/crds; wait until they serve."""
    for f in sorted(CRDS.glob("*.yaml")):
        kubectl(settings, "apply", "--server-side", "--force-conflicts", "-f", str(f))
    names = [f"crd/{d['metadata']['name']}" for d in crd_docs()]
    kubectl(settings, "wait", "--for=condition=Established", "--timeout=120s", *names)
    return names


def pods(docs: list[Doc]) -> list[tuple[Doc, Doc]]:
    """(workload, pod template) of every workload."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in WORKLOADS]


def containers(pod: Doc) -> list[Doc]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The container's plain variables, with those of the ConfigMaps it takes whole."""
    out: dict[str, str] = {}
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            out.update(maps[source["configMapRef"]["name"]])
    out.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return out


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The single object of ``kind`` (named ``name``, if given)."""
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} objects {kind}/{name or '*'}"
    return found[0]


def product_settings(docs: list[Doc]) -> Settings:
    """The settings the product's pods get from the fleetpulse-env ConfigMap."""
    data = one(docs, "ConfigMap", "fleetpulse-env")["data"]
    return load_settings({k: v for k, v in data.items() if k.startswith(ENV_PREFIX)})


def kafka_version() -> str:
    """The Kafka release the project's broker image runs (deploy/containers.py)."""
    return next(i.tag for i in IMAGES if i.name == "fleetpulse-kafka")


def setting(doc: Doc, path: list[str | int], value: Any) -> Doc:
    """A copy of ``doc`` with the value at ``path`` (keys and list indexes) replaced."""
    out = copy.deepcopy(doc)
    node = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out
