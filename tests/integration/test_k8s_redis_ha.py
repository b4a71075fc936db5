"""The ha overlay's Redis (master/replicas + a Sentinel per pod) held against the product:
the Sentinel config its start script renders (run here with the rendered inputs) has
quorum 2, the settings' down-after and failover timeout and the product's master name;
FLEETPULSE_REDIS_SENTINELS names exactly the Sentinels that exist (pod DNS names on the
headless Service, a declared port); the config lives in a writable volume; the PDB holds
a quorum. The minikube overlay keeps its single Redis. (That the API server accepts the
objects is test_k8s_manifests.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from redis.sentinel import SentinelConnectionPool

from deploy.local.cluster import Cluster
from fleetpulse.settings import Settings, load_settings
from state.connect import connect
from tests.integration.k8s_util import (
    OVERLAYS,
    Doc,
    containers,
    env,
    of_kind,
    one,
    pods,
    product_settings,
    render,
    selects,
)

pytestmark = pytest.mark.timeout(1800)

HA = [o for o in OVERLAYS if o != "minikube"]  # ha and those built on it


def _redis(docs: list[Doc]) -> tuple[Doc, Doc]:
    sts = one(docs, "StatefulSet", "redis")
    return sts, sts["spec"]["template"]


def _container(pod: Doc, name: str) -> Doc:
    (found,) = [c for c in containers(pod) if c["name"] == name]
    return found


def _port(container: Doc, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _render_config(docs: list[Doc], pod: Doc, pod_name: str, tmp: Path) -> dict[str, str]:
    """Run the init container's script as the pod would, no Sentinel answering."""
    init = _container(pod, "config")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    script_mount = next(m for m in init["volumeMounts"] if m["name"] == "scripts")
    script_map = one(docs, "ConfigMap", volumes["scripts"]["configMap"]["name"])
    script_name = Path(init["command"][-1]).relative_to(script_mount["mountPath"])
    tmp.mkdir(parents=True)
    script = tmp / "render-config.sh"
    script.write_text(script_map["data"][str(script_name)])
    stub = tmp / "redis-cli"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    variables = env(init, docs)
    conf = tmp / "conf"
    variables.update(
        {
            "PATH": "/usr/bin:/bin",
            "POD_NAME": pod_name,
            "REDIS_CLI": str(stub),
            "CONF_DIR": str(conf),
        }
    )
    subprocess.run(["sh", str(script)], env=variables, check=True, capture_output=True, timeout=30)
    return {p.name: p.read_text() for p in conf.iterdir()}


@pytest.mark.parametrize("overlay", HA)
def test_the_sentinels_watch_the_products_master_with_quorum_2_and_the_seeds_timeouts(
    k8s: Cluster, settings: Settings, overlay: str, tmp_path: Path
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    product = product_settings(docs)
    sts, pod = _redis(docs)
    init = _container(pod, "config")
    assert "readOnly" not in next(m for m in init["volumeMounts"] if m["name"] == "conf")
    for i in range(sts["spec"]["replicas"]):
        files = _render_config(docs, pod, f"redis-{i}", tmp_path / str(i))
        sentinel = files["sentinel.conf"].splitlines()
        name = product.redis_sentinel_master
        assert [line for line in sentinel if line.startswith("sentinel monitor ")] == [
            f"sentinel monitor {name} redis-0.redis {_port(_container(pod, 'redis'), 'redis')} 2"
        ]
        assert f"sentinel down-after-milliseconds {name} 5000" in sentinel
        assert product.sentinel_down_after_ms == 5000  # the seed's
        assert (
            f"sentinel failover-timeout {name} {product.sentinel_failover_timeout_ms}" in sentinel
        )
        assert "sentinel resolve-hostnames yes" in sentinel
        assert "sentinel announce-hostnames yes" in sentinel
        assert f"sentinel announce-ip redis-{i}.redis" in sentinel
        assert f"port {_port(_container(pod, 'sentinel'), 'sentinel')}" in sentinel
        redis_conf = files["redis.conf"].splitlines()
        assert f"replica-announce-ip redis-{i}.redis" in redis_conf
        assert ("replicaof redis-0.redis 6379" in redis_conf) == (i != 0)


@pytest.mark.parametrize("overlay", HA)
def test_the_product_is_given_exactly_the_sentinels_that_exist(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    sts, pod = _redis(docs)
    service = one(docs, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # pod DNS names: redis-N.redis
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    sentinel = _container(pod, "sentinel")
    port = _port(sentinel, "sentinel")
    assert {"name": "sentinel", "port": port, "targetPort": "sentinel"} in service["spec"]["ports"]
    name = service["metadata"]["name"]
    expected = [
        f"{sts['metadata']['name']}-{i}.{name}:{port}" for i in range(sts["spec"]["replicas"])
    ]
    product = product_settings(docs)
    assert product.redis_sentinels.split(",") == expected
    assert sts["spec"]["replicas"] == 3
    # Every fleetpulse container reads them (from fleetpulse-env), and so connects
    # through the Sentinels to the master of that name (state/connect.py; no I/O yet).
    readers = 0
    for _, template in pods(docs):
        for c in template["spec"]["containers"]:
            if c["image"].startswith("localhost/fleetpulse:") and "args" in c:
                ours = {k: v for k, v in env(c, docs).items() if k.startswith("FLEETPULSE_")}
                assert ours["FLEETPULSE_REDIS_SENTINELS"] == ",".join(expected), c["name"]
                readers += 1
    assert readers >= 3  # ingest, query, dataflow
    client = connect(load_settings({"FLEETPULSE_REDIS_SENTINELS": product.redis_sentinels,
                                    "FLEETPULSE_REDIS_SENTINEL_MASTER": product.redis_sentinel_master}))  # fmt: skip
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == product.redis_sentinel_master
    hosts = [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
             for s in pool.sentinel_manager.sentinels]  # fmt: skip
    assert hosts == [(e.rpartition(":")[0], port) for e in expected]


@pytest.mark.parametrize("overlay", HA)
def test_config_is_in_a_writable_volume_and_the_pdb_keeps_a_quorum(
    k8s: Cluster, settings: Settings, overlay: str
) -> None:
    docs = render(settings, f"overlays/{overlay}")
    sts, pod = _redis(docs)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for name, conf in (("redis", "redis.conf"), ("sentinel", "sentinel.conf")):
        c = _container(pod, name)
        (path,) = [a for a in c["args"] if a.endswith(conf)]
        (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert volumes[mount["name"]] == {"name": mount["name"], "emptyDir": {}}, name
        assert not mount.get("readOnly") and "subPath" not in mount, name
    (pdb,) = [
        p
        for p in of_kind(docs, "PodDisruptionBudget")
        if selects(p["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    ]
    assert pdb["spec"]["minAvailable"] == 2 < sts["spec"]["replicas"]
    spread = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert (
        spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == sts["spec"]["selector"]["matchLabels"]
    )


def test_minikube_keeps_a_single_redis_without_sentinels(k8s: Cluster, settings: Settings) -> None:
    docs = render(settings, "overlays/minikube")
    sts, pod = _redis(docs)
    assert sts["spec"]["replicas"] == 1
    assert [c["name"] for c in containers(pod)] == ["redis"]
    assert product_settings(docs).redis_sentinels == ""
