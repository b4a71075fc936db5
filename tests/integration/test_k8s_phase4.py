"""Phase 3 on Strimzi and phase 4 in deploy/k8s, held together: the Strimzi cluster and
its topics against the settings and fleetpulse.topics, the Istio canary's weights and
subsets against the pods, the chaos experiments' selectors against the ha overlay's
pods, and MirrorMaker 2 against both clusters. (That the API server accepts them, after
their CRDs, is test_k8s_manifests.py.)
"""

from __future__ import annotations

import re

import pytest

from deploy.local.cluster import Cluster
from fleetpulse.settings import Settings
from fleetpulse.topics import product_topics, topic_configs
from tests.integration.k8s_util import (
    NAMESPACE,
    Doc,
    kafka_version,
    of_kind,
    one,
    pods,
    product_settings,
    render,
    selects,
)

pytestmark = pytest.mark.timeout(1800)


# --- Strimzi ------------------------------------------------------------------------------


def _nodes(docs: list[Doc], cluster: str, role: str) -> int:
    pools = [
        p
        for p in of_kind(docs, "KafkaNodePool")
        if p["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    ]
    return sum(p["spec"]["replicas"] for p in pools if role in p["spec"]["roles"])


def test_the_strimzi_cluster_is_kraft_on_3_dual_role_nodes_of_our_kafka_release(
    k8s: Cluster, settings: Settings
) -> None:
    docs = render(settings, "strimzi")
    kafka = one(docs, "Kafka")
    name = kafka["metadata"]["name"]
    notes = kafka["metadata"]["annotations"]
    assert notes["strimzi.io/node-pools"] == "enabled" and notes["strimzi.io/kraft"] == "enabled"
    assert kafka["spec"]["kafka"]["version"] == kafka_version() == "4.1.1"
    assert (_nodes(docs, name, "broker"), _nodes(docs, name, "controller")) == (3, 3)
    config = kafka["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] == 2 and config["default.replication.factor"] == 3
    assert config["auto.create.topics.enable"] is False  # as the other layouts: typos fail
    pool = one(docs, "KafkaNodePool")
    assert pool["spec"]["resources"]["requests"] and pool["spec"]["resources"]["limits"]["memory"]
    spread = pool["spec"]["template"]["pod"]["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"] == {
        "strimzi.io/cluster": name,
        "strimzi.io/pool-name": pool["metadata"]["name"],
    }
    for pod_template in (
        pool["spec"]["template"]["pod"],
        kafka["spec"]["kafka"]["template"]["pod"],
        kafka["spec"]["entityOperator"]["template"]["pod"],
    ):
        assert pod_template["securityContext"]["runAsNonRoot"] is True
    operator = kafka["spec"]["entityOperator"]["topicOperator"]["resources"]
    assert operator["requests"] and operator["limits"]["memory"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert kafka["spec"]["kafka"][probe]["timeoutSeconds"] >= 1


def test_the_strimzi_overlay_runs_the_product_on_that_cluster_with_its_topics(
    k8s: Cluster, settings: Settings
) -> None:
    docs = render(settings, "overlays/strimzi")
    kafka = one(docs, "Kafka")
    name = kafka["metadata"]["name"]
    brokers = _nodes(docs, name, "broker")
    s = product_settings(docs)
    (plain,) = [x for x in kafka["spec"]["kafka"]["listeners"] if not x["tls"]]
    assert s.kafka_bootstrap == f"{name}-kafka-bootstrap:{plain['port']}"
    # The ha overlay's own Kafka and topics Job are gone; nothing else is.
    kinds_names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "kafka"), ("Service", "kafka"), ("Job", "topics")}.isdisjoint(
        kinds_names
    )
    ha = {(d["kind"], d["metadata"]["name"]) for d in render(settings, "overlays/ha")}
    assert ha - kinds_names == {("StatefulSet", "kafka"), ("Service", "kafka"), ("Job", "topics")}
    # The Strimzi folder's objects are in it unchanged.
    assert all(d in docs for d in render(settings, "strimzi"))

    topics = [
        t
        for t in of_kind(docs, "KafkaTopic")
        if t["metadata"]["labels"]["strimzi.io/cluster"] == name
    ]
    by_name = {t["spec"].get("topicName", t["metadata"]["name"]): t["spec"] for t in topics}
    assert sorted(by_name) == sorted(product_topics(s))
    for topic, spec in by_name.items():
        rf = spec["replicas"]
        min_isr = int(spec["config"]["min.insync.replicas"])
        assert spec["partitions"] == s.kafka_partitions, topic
        assert rf == s.kafka_replication == 3, topic
        assert min_isr + 1 <= rf <= brokers, topic
        configs = {k: str(v) for k, v in spec["config"].items()}
        assert configs == topic_configs(rf, reports=topic == s.topic_reports), topic


# --- the Istio canary ------------------------------------------------------------------------


def _names_service(host: str, service: str) -> bool:
    return host in (service, f"{service}.{NAMESPACE}", f"{service}.{NAMESPACE}.svc",
                    f"{service}.{NAMESPACE}.svc.cluster.local")  # fmt: skip


def test_the_canary_sends_90_10_to_two_versions_that_exist(
    k8s: Cluster, settings: Settings
) -> None:
    docs = render(settings, "overlays/canary")
    svc = one(docs, "Service", "query")
    rule = one(docs, "DestinationRule", "query")
    route = one(docs, "VirtualService", "query")
    assert _names_service(rule["spec"]["host"], "query")
    assert all(_names_service(h, "query") for h in route["spec"]["hosts"])
    subsets = {s["name"]: s["labels"] for s in rule["spec"]["subsets"]}

    # Every route's weights make 100, to subsets the DestinationRule has.
    weights: dict[str, int] = {}
    for http in route["spec"]["http"]:
        assert sum(r["weight"] for r in http["route"]) == 100, http
        for r in http["route"]:
            assert _names_service(r["destination"]["host"], "query")
            assert r["destination"]["subset"] in subsets, r
            weights[r["destination"]["subset"]] = r["weight"]
    assert weights == {"v1": 90, "v2": 10}

    # Each subset is the pods of one Deployment behind the Service; none are left over.
    behind = [
        (w, p) for w, p in pods(docs) if selects(svc["spec"]["selector"], p["metadata"]["labels"])
    ]
    chosen: dict[str, str] = {}
    for subset, labels in subsets.items():
        (workload,) = [w for w, p in behind if selects(labels, p["metadata"]["labels"])]
        assert workload["kind"] == "Deployment"
        chosen[subset] = workload["metadata"]["name"]
    assert chosen == {"v1": "query-v1", "v2": "query-v2"}
    assert sorted(w["metadata"]["name"] for w, _ in behind) == ["query-v1", "query-v2"]

    # The two versions differ only in their labels (the candidate's image comes later).
    v1, v2 = (one(docs, "Deployment", n)["spec"]["template"] for n in ("query-v1", "query-v2"))
    assert v1["spec"] == v2["spec"]
    for version, template in (("v1", v1), ("v2", v2)):
        assert template["metadata"]["labels"]["version"] == version
        assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    # Only the query API is in the mesh; each version scales by itself.
    injected = {
        w["metadata"]["name"]
        for w, p in pods(docs)
        if "sidecar.istio.io/inject" in p["metadata"]["labels"]
    }
    assert injected == {"query-v1", "query-v2"}
    targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    assert {"query-v1", "query-v2"} <= targets and "query" not in targets


# --- Chaos Mesh ------------------------------------------------------------------------------


def _chaos_selects(selector: Doc, docs: list[Doc]) -> set[str]:
    """Names of the workloads whose pods a Chaos Mesh selector picks."""
    assert selector["namespaces"] == [NAMESPACE]
    picked = set()
    for workload, pod in pods(docs):
        labels = pod["metadata"]["labels"]
        if not selects(selector.get("labelSelectors", {}), labels):
            continue
        expressions = selector.get("expressionSelectors", [])
        for e in expressions:
            assert e["operator"] == "In", e  # the only operator used here
        if all(labels.get(e["key"]) in e["values"] for e in expressions):
            picked.add(workload["metadata"]["name"])
    return picked


def test_chaos_experiments_pick_pods_of_the_ha_overlay(k8s: Cluster, settings: Settings) -> None:
    chaos = render(settings, "chaos")
    ha = render(settings, "overlays/ha")
    replicas = {w["metadata"]["name"]: w["spec"].get("replicas") for w, _ in pods(ha)}

    broker = one(chaos, "PodChaos", "kafka-broker-kill")["spec"]
    assert (broker["action"], broker["mode"]) == ("pod-kill", "one")
    assert _chaos_selects(broker["selector"], ha) == {"kafka"} and replicas["kafka"] == 3

    flow = one(chaos, "PodChaos", "dataflow-pod-kill")["spec"]
    assert (flow["action"], flow["mode"]) == ("pod-kill", "one")
    assert _chaos_selects(flow["selector"], ha) == {"dataflow"}

    delay = one(chaos, "NetworkChaos", "kafka-delay")["spec"]
    assert delay["action"] == "delay"
    assert (delay["delay"]["latency"], delay["delay"]["jitter"]) == ("100ms", "20ms")
    assert _chaos_selects(delay["selector"], ha) == {"kafka"}
    assert _chaos_selects(delay["target"]["selector"], ha) == {"ingest", "dataflow"}

    schedule = one(chaos, "Schedule")["spec"]
    assert schedule["type"] == "PodChaos" and schedule["concurrencyPolicy"] == "Forbid"
    assert schedule["podChaos"]["action"] == "pod-kill"
    assert _chaos_selects(schedule["podChaos"]["selector"], ha) == {"kafka"}
    for doc in chaos:
        assert doc["metadata"]["namespace"] == NAMESPACE


# --- MirrorMaker 2 ---------------------------------------------------------------------------


def test_mirror_maker_copies_the_product_topics_from_ha_to_strimzi(
    k8s: Cluster, settings: Settings
) -> None:
    mm2 = one(render(settings, "mirror"), "KafkaMirrorMaker2")["spec"]
    ha = product_settings(render(settings, "overlays/ha"))
    strimzi_docs = render(settings, "overlays/strimzi")
    target = product_settings(strimzi_docs)
    assert mm2["version"] == kafka_version()
    assert mm2["resources"]["requests"] and mm2["resources"]["limits"]["memory"]
    assert mm2["template"]["pod"]["securityContext"]["runAsNonRoot"] is True
    assert "readinessProbe" in mm2 and "livenessProbe" in mm2
    assert mm2["target"]["bootstrapServers"] == target.kafka_bootstrap
    (mirror,) = mm2["mirrors"]
    assert mirror["source"]["bootstrapServers"] == ha.kafka_bootstrap
    assert mirror["source"]["alias"] != mm2["target"]["alias"]

    # Exactly the product's topics: the pattern's dots are dots.
    topics = re.compile(mirror["topicsPattern"])
    assert all(topics.fullmatch(t) for t in product_topics(ha))
    for other in (
        "robotXreports",
        "robot.reports.dlqX",
        "fleetpulse-mirror-configs",
        "__consumer_offsets",
    ):
        assert not topics.fullmatch(other), other
    # Same names on the target, which has them, with the same partitions (a message
    # keeps its partition, and a robot's reports their order).
    source, checkpoint = (
        mirror["sourceConnector"]["config"],
        mirror["checkpointConnector"]["config"],
    )
    identity = "org.apache.kafka.connect.mirror.IdentityReplicationPolicy"
    assert source["replication.policy.class"] == checkpoint["replication.policy.class"] == identity
    assert source["offset-syncs.topic.location"] == checkpoint["offset-syncs.topic.location"]
    assert source["sync.topic.configs.enabled"] is False  # the KafkaTopics own them
    made = {t["spec"]["topicName"]: t["spec"] for t in of_kind(strimzi_docs, "KafkaTopic")}
    assert sorted(made) == sorted(product_topics(ha))
    assert all(spec["partitions"] == ha.kafka_partitions for spec in made.values())
    # Consumer groups' offsets follow; the dataflow's group has none to follow.
    assert checkpoint["sync.group.offsets.enabled"] is True
    assert re.fullmatch(mirror["groupsExcludePattern"], ha.consumer_group)
    assert re.fullmatch(mirror["groupsPattern"], "alerts-consumer")
    assert not re.fullmatch(mirror["groupsExcludePattern"], "alerts-consumer")
    # Its own topics fit the target (3 brokers).
    factors = [int(v) for k, v in {**mm2["target"]["config"], **source, **checkpoint}.items()
               if k.endswith("replication.factor")]  # fmt: skip
    assert factors and all(1 <= f <= 3 for f in factors)
