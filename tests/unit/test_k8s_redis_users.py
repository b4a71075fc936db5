"""Kubernetes (deploy/k8s/base): the Redis users of least privilege reach only their pods,
and `just k8s-deploy` fills the Secrets left empty (read from the files, no cluster;
tests/integration/test_k8s_manifests.py renders every overlay with kustomize)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import yaml

from deploy.local.cluster import fill_redis_secrets
from fleetpulse.settings import load_settings
from state.acl import RedisUsers

BASE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base"


def _docs(*names: str) -> list[dict[str, Any]]:
    return [d for n in names for d in yaml.safe_load_all((BASE / n).read_text()) if d]


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _secrets_of(container: dict[str, Any]) -> set[str]:
    return {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}


def test_each_pod_gets_only_its_own_redis_secret() -> None:
    workloads = {
        d["metadata"]["name"]: d
        for d in _docs(
            "dataflow.yaml",
            "query-deployment/deployment.yaml",
            "dashboard.yaml",
            "ingest.yaml",
            "redis.yaml",
        )
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    redis_secrets = {"fleetpulse-redis-writer", "fleetpulse-redis-reader"}
    held = {
        name: _secrets_of(_pod(w)["containers"][0]) & redis_secrets for name, w in workloads.items()
    }
    assert held == {
        "dataflow": {"fleetpulse-redis-writer"},
        "query": {"fleetpulse-redis-reader"},
        "dashboard": {"fleetpulse-redis-reader"},
        "ingest": set(),
        "redis": set(),
    }
    redis = _pod(workloads["redis"])
    container = redis["containers"][0]
    assert container["args"][-2:] == ["--aclfile", "/etc/redis-acl/users.acl"]
    assert {"name": "acl", "mountPath": "/etc/redis-acl", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert redis["volumes"] == [
        {
            "name": "acl",
            "secret": {
                "secretName": "redis-acl",
                "items": [{"key": "users.acl", "path": "users.acl"}],
            },
        }
    ]


def test_deploy_fills_the_empty_redis_secrets_once(tmp_path: Path) -> None:
    settings = msgspec.structs.replace(load_settings({}), stack_dir=str(tmp_path))
    docs = _docs("config.yaml")
    fill_redis_secrets(settings, docs)
    by_name = {
        d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"
    }
    users = RedisUsers.kept(tmp_path / "k8s" / "redis-users.json")
    assert by_name["fleetpulse-redis-writer"] == users.writer_env()
    assert by_name["fleetpulse-redis-reader"] == users.reader_env()
    acl = by_name["redis-acl"]["users.acl"]
    admin = by_name["redis-acl"]["admin-password"]
    assert [line.split()[1] for line in acl.splitlines()] == [
        "fleetpulse-sink",
        "fleetpulse-api",
        "default",
    ]
    assert " ~fp:* " in acl.splitlines()[0]  # the prefix of the fleetpulse-env ConfigMap
    for secret in (users.writer_password, users.reader_password, admin):
        assert secret not in acl
    assert by_name["fleetpulse-tokens"] == {"FLEETPULSE_API_TOKENS": ""}  # not ours
    for kept in ("redis-users.json", "redis-admin-password"):
        assert (tmp_path / "k8s" / kept).stat().st_mode & 0o777 == 0o600
    # A second deploy: the same passwords; a Secret someone filled is left alone.
    again = _docs("config.yaml")
    mine = next(d for d in again if d["metadata"]["name"] == "fleetpulse-redis-reader")
    mine["stringData"] = {
        "FLEETPULSE_REDIS_API_USERNAME": "ops",
        "FLEETPULSE_REDIS_API_PASSWORD": "x",
    }
    fill_redis_secrets(settings, again)
    filled = {
        d["metadata"]["name"]: d.get("stringData", {}) for d in again if d["kind"] == "Secret"
    }
    assert filled["redis-acl"]["admin-password"] == admin
    assert filled["fleetpulse-redis-writer"] == users.writer_env()
    assert filled["fleetpulse-redis-reader"]["FLEETPULSE_REDIS_API_USERNAME"] == "ops"
