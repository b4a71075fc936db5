"""fleetpulse on the local Kubernetes node (`just k8s-up`, `just k8s-deploy`): the minikube
overlay rolls out on real pods (containerd, kubelet, kube-proxy, cluster DNS); reports go in
through the ingest Service and come out as live state through the query Service; a deleted
dataflow pod resumes from its volume, a ConfigMap edit reaches the running pods, pods
killed in a loop (Chaos Mesh's PodChaos, done with kubectl) and a lost broker of the ha
overlay lose nothing that was acknowledged.

Every report is posted over HTTP to a Service's cluster address (routed by kube-proxy);
what counts as acknowledged is a 202. At the end each robot's history (through the query
Service) holds every acknowledged report.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import httpx
import pytest

from deploy.local.cluster import (
    NAMESPACE,
    Cluster,
    deploy,
    dev_tokens,
    kubectl,
    service_url,
    wait_rollout,
)
from deploy.local.harness import BASE_TS, report
from deploy.local.main import Tokens
from fleetpulse.settings import Settings

pytestmark = [pytest.mark.timeout(1800), pytest.mark.k8s_node]

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pods = kubectl_text("get", "pods", "-n", NAMESPACE, "-o", "wide")
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}\n{pods}")
        time.sleep(0.5)


_SETTINGS: list[Settings] = []


def kubectl_text(*args: str, input: str | None = None) -> str:
    return kubectl(_SETTINGS[0], *args, input=input)


def pods() -> dict[str, dict[str, Any]]:
    out = kubectl_text("get", "pods", "-n", NAMESPACE, "-o", "json")
    return {p["metadata"]["name"]: p for p in json.loads(out)["items"]}


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


class Fleet:
    """Robots posting through the ingest Service; what was acknowledged (202), per robot."""

    def __init__(self, ingest: str, query: str, tokens: Tokens, prefix: str, robots: int) -> None:
        self.ingest = httpx.Client(
            base_url=ingest, headers={"Authorization": f"Bearer {tokens.ingest}"}, timeout=5
        )
        self.query = httpx.Client(
            base_url=query, headers={"Authorization": f"Bearer {tokens.read}"}, timeout=5
        )
        self.robots = [f"{prefix}-{os.getpid()}-{i}" for i in range(robots)]
        self.acked: dict[str, set[int]] = {r: set() for r in self.robots}
        self.refused = 0
        self.answers: Counter[str] = Counter()  # status code or exception, per round
        self.seq = 0
        self.last_missing: dict[str, list[int]] = {}
        self.checked: set[tuple[str, int]] = set()  # acknowledged and seen in a history
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def post_round(self, **over: Any) -> None:
        """One report per robot in one batch; the seqs acknowledged are recorded."""
        self.seq += 1
        now = time.time() - BASE_TS
        batch = [report(r, self.seq, t=now, **over) for r in self.robots]
        try:
            r = self.ingest.post("/v1/reports/batch", json=batch)
        except httpx.HTTPError as exc:
            self.refused += 1
            self.answers[type(exc).__name__] += 1
            return
        self.answers[str(r.status_code)] += 1
        if r.status_code == 202:
            for robot in self.robots:
                self.acked[robot].add(self.seq)
        else:
            self.refused += 1

    def acked_rounds(self) -> int:
        return len(self.acked[self.robots[0]])  # a round is one batch: all or none

    def unverified(self) -> int:
        """Acknowledged reports never seen in a history (only possible when a run posts
        more rounds than the history keeps: then the test cannot vouch for them)."""
        return sum(1 for r, seqs in self.acked.items() for q in seqs if (r, q) not in self.checked)

    def start(self, every_s: float = 1.0, **over: Any) -> Fleet:
        def run() -> None:
            while not self._stop.is_set():
                self.post_round(**over)
                self._stop.wait(every_s)

        self._stop.clear()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def close(self) -> None:
        self.stop()
        self.ingest.close()
        self.query.close()

    def state(self, robot: str) -> dict[str, Any] | None:
        try:
            r = self.query.get(f"/v1/robots/{robot}")
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def history(self, robot: str) -> set[int] | None:
        try:
            r = self.query.get(f"/v1/robots/{robot}/history", params={"limit": 1000})
        except httpx.HTTPError:
            return None
        return {item["seq"] for item in r.json()["items"]} if r.status_code == 200 else None

    def missing(self) -> dict[str, list[int]]:
        """Acknowledged reports not (yet) in their robot's history, by robot. The history
        keeps a robot's newest FLEETPULSE_HISTORY_LEN reports (the pods' default): older
        ones are checked while they are in it, the newest always."""
        out = {}
        kept = Settings().history_len
        for robot in self.robots:
            seen = self.history(robot)
            acked = {seq for seq in self.acked[robot] if seq > self.seq - kept}
            self.checked |= {(robot, seq) for seq in acked & (seen or set())}
            lost = sorted(acked - (seen or set()))
            if lost:
                out[robot] = lost
        return out

    def all_applied(self) -> bool:
        """Every acknowledged report of every robot is in its history."""
        self.last_missing = self.missing()
        return not self.last_missing


@pytest.fixture(scope="module")
def cluster(settings: Settings) -> Iterator[Cluster]:
    _SETTINGS[:] = [settings]
    cluster = Cluster(settings)
    cluster.up()
    deploy(settings, "minikube")
    yield cluster


@pytest.fixture(scope="module")
def tokens(cluster: Cluster, settings: Settings) -> Tokens:
    return dev_tokens(settings)


@pytest.fixture
def fleet(cluster: Cluster, settings: Settings, tokens: Tokens) -> Iterator[Fleet]:
    ingest, query = service_url(settings, "ingest"), service_url(settings, "query")
    f = Fleet(ingest, query, tokens, "k8s", 10)
    yield f
    f.close()


def test_the_overlay_runs_on_real_pods_with_cluster_dns(cluster: Cluster) -> None:
    running = pods()
    assert {"kafka-0", "redis-0", "dataflow-0", "dataflow-1"} <= set(running)
    for name, pod in running.items():
        if pod["metadata"].get("ownerReferences", [{}])[0].get("kind") == "Job":
            assert pod["status"]["phase"] == "Succeeded", name
        else:
            assert ready(pod), name
            assert pod["status"]["podIP"].startswith("10.244.0."), name
    # Names resolve inside a pod through the cluster DNS: a StatefulSet pod's own name
    # (headless Service) to that pod, a Service to its cluster address.
    resolve = "import socket,sys; print(' '.join(socket.gethostbyname(n) for n in sys.argv[1:]))"
    query_pod = next(n for n in running if n.startswith("query-"))
    out = kubectl_text(
        "exec", "-n", NAMESPACE, query_pod, "--", "python", "-c", resolve,
        "kafka-0.kafka", "redis", "kubernetes.default",
    ).split()  # fmt: skip
    redis_ip = json.loads(kubectl_text("get", "svc", "redis", "-n", NAMESPACE, "-o", "json"))
    assert out == [
        running["kafka-0"]["status"]["podIP"],
        redis_ip["spec"]["clusterIP"],
        "10.96.0.1",
    ]


def test_a_report_through_the_ingest_service_is_live_state_through_the_query_service(
    fleet: Fleet,
) -> None:
    fleet.post_round(battery=77.5, status="charging")
    assert fleet.refused == 0
    robot = fleet.robots[0]
    state = wait_for("the report as live state", lambda: fleet.state(robot), 60)
    assert state["report"]["seq"] == 1 and state["report"]["battery"] == 77.5
    assert state["report"]["status"] == "charging" and state["online"] is True
    # A wrong token is refused by the pods behind the Service.
    bad = httpx.get(
        f"{fleet.query.base_url}/v1/robots/{robot}",
        headers={"Authorization": "Bearer nope"},
        timeout=5,
    )
    assert bad.status_code == 401


def test_the_dashboard_service_serves_the_page_and_reads_every_pods_metrics(
    cluster: Cluster, settings: Settings, tokens: Tokens
) -> None:
    board = service_url(settings, "dashboard")
    page = httpx.get(f"{board}/", timeout=10)
    assert page.status_code == 200 and '<canvas id="map">' in page.text
    headers = {"Authorization": f"Bearer {tokens.read}"}
    running = pods()

    def every_pod_read() -> dict[str, Any] | None:
        figures = httpx.get(f"{board}/v1/dashboard/pipeline", headers=headers, timeout=10).json()
        up = sorted((t["role"], t["up"]) for t in figures["targets"])
        return figures if up == [("dataflow", True)] * 2 + [("ingest", True)] else None

    figures = wait_for(
        "the dashboard reading the ingest and both dataflow pods", every_pod_read, 60
    )
    # Each pod is read at its own address (the headless Services' DNS answers).
    addresses = {t["url"].split("/")[2].split(":")[0] for t in figures["targets"]}
    pod_ips = {
        p["status"]["podIP"] for n, p in running.items() if n.startswith(("ingest-", "dataflow-"))
    }
    assert addresses == pod_ips
    env = json.loads(
        kubectl_text("get", "configmap", "fleetpulse-env", "-n", NAMESPACE, "-o", "json")
    )
    partitions = int(env["data"]["FLEETPULSE_KAFKA_PARTITIONS"])
    assert set(figures["lag"]) == {str(p) for p in range(partitions)}


def test_a_deleted_dataflow_pod_resumes_from_its_volume_with_nothing_lost(
    fleet: Fleet, cluster: Cluster
) -> None:
    for _ in range(5):
        fleet.post_round()
    wait_for("the first reports applied", fleet.all_applied, 90)
    before = pods()["dataflow-0"]
    claim = json.loads(
        kubectl_text("get", "pvc", "recovery-dataflow-0", "-n", NAMESPACE, "-o", "json")
    )
    volume = claim["spec"]["volumeName"]
    folder = next((cluster.root / "k8s" / "volumes").glob(f"{NAMESPACE}-recovery-dataflow-0-*"))
    assert any(folder.iterdir()), "the recovery volume holds the flow's snapshots"

    fleet.start()
    kubectl_text("delete", "pod", "dataflow-0", "-n", NAMESPACE, "--wait=false")
    wait_for(
        "a new dataflow-0 Ready",
        lambda: (
            (p := pods().get("dataflow-0"))
            and p["metadata"]["uid"] != before["metadata"]["uid"]
            and ready(p)
        ),
        180,
    )
    time.sleep(3)
    fleet.stop()
    wait_for("every acknowledged report applied", fleet.all_applied, 120)
    after = json.loads(
        kubectl_text("get", "pvc", "recovery-dataflow-0", "-n", NAMESPACE, "-o", "json")
    )
    assert after["spec"]["volumeName"] == volume  # the same volume, not a fresh one
    assert fleet.unverified() == 0
    assert sum(len(s) for s in fleet.acked.values()) >= 8 * len(fleet.robots)


def _flow_metrics(pod: dict[str, Any]) -> str:
    return httpx.get(f"http://{pod['status']['podIP']}:9464/metrics", timeout=5).text


def test_a_configmap_edit_changes_a_threshold_in_the_running_pods(
    fleet: Fleet, settings: Settings
) -> None:
    original = json.loads(
        kubectl_text("get", "configmap", "fleetpulse-config", "-n", NAMESPACE, "-o", "json")
    )
    flows = {n: p["metadata"]["uid"] for n, p in pods().items() if n.startswith("dataflow-")}
    restarts = {
        n: p["status"]["containerStatuses"][0]["restartCount"]
        for n, p in pods().items()
        if n.startswith("dataflow-")
    }

    def low_battery() -> set[str]:
        r = fleet.query.get("/v1/alerts", params={"kind": "low_battery", "limit": 500})
        return {a["robot_id"] for a in r.json()["items"]} & set(fleet.robots)

    try:
        fleet.start(battery=40.0)
        wait_for("reports at 40 % applied", lambda: all(fleet.state(r) for r in fleet.robots), 60)
        time.sleep(2)
        assert low_battery() == set()  # 40 % is fine under 20 / 25
        edited = "low_battery_pct: 50\nbattery_ok_pct: 55\noffline_after_s: 15\n"
        patch = {"data": {"fleetpulse.yaml": edited}}
        kubectl_text(
            "patch", "configmap", "fleetpulse-config", "-n", NAMESPACE,
            "--type=merge", "-p", json.dumps(patch),
        )  # fmt: skip
        # The kubelet refreshes the mounted folder on its next sync of the pod.
        wait_for("low_battery for every robot", lambda: low_battery() == set(fleet.robots), 120)
        now = pods()
        assert {n: now[n]["metadata"]["uid"] for n in flows} == flows  # no pod replaced
        assert {n: now[n]["status"]["containerStatuses"][0]["restartCount"] for n in flows} == (
            restarts
        )  # and no container restarted
        applied = [_flow_metrics(now[n]) for n in flows]
        assert all('fleetpulse_config_reloads_total{result="applied"} 1.0' in m for m in applied)
    finally:
        fleet.stop()
        restore = {"data": original["data"]}
        kubectl_text(
            "patch", "configmap", "fleetpulse-config", "-n", NAMESPACE,
            "--type=merge", "-p", json.dumps(restore),
        )  # fmt: skip


def _replaced(prefix: str, uid: str) -> bool:
    """A pod named ``prefix``... other than ``uid`` is Ready and not being deleted."""
    return any(
        n.startswith(prefix)
        and p["metadata"]["uid"] != uid
        and ready(p)
        and p["metadata"].get("deletionTimestamp") is None
        for n, p in pods().items()
    )


def test_pods_killed_in_a_loop_lose_nothing_acknowledged(fleet: Fleet) -> None:
    """Chaos Mesh's PodChaos (pod-kill) done with kubectl: the ingest, a dataflow process,
    the broker and the query pod, one after the other, each back Ready before the next."""
    fleet.start()
    wait_for("reports acknowledged before the kills", lambda: fleet.acked_rounds() >= 3, 60)
    for victim in ("ingest-", "dataflow-1", "kafka-0", "query-"):
        name = next(n for n in pods() if n.startswith(victim))
        uid = pods()[name]["metadata"]["uid"]
        kubectl_text("delete", "pod", name, "-n", NAMESPACE, "--wait=false", "--grace-period=1")
        wait_for(f"{victim} replaced and Ready", partial(_replaced, victim, uid), 240)
    wait_rollout(_SETTINGS[0], NAMESPACE, 240)
    # The recovered pods take the load again (refusals while a pod was gone are fine:
    # only a loss of something acknowledged is not).
    after = fleet.acked_rounds()
    wait_for(
        f"reports acknowledged again (answers so far: {dict(fleet.answers)})",
        lambda: fleet.acked_rounds() >= after + 5,
        120,
    )
    fleet.stop()
    try:
        wait_for("every acknowledged report applied", fleet.all_applied, 180)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nmissing: {fleet.last_missing}") from None
    assert fleet.unverified() == 0, dict(fleet.answers)
    print(f"answers to the fleet during the pod kills: {dict(fleet.answers)}")


def test_the_ha_overlay_loses_a_broker_pod_and_nothing_acknowledged(
    settings: Settings, cluster: Cluster, tokens: Tokens
) -> None:
    # Kafka's quorum changes from one voter to three: the ha overlay starts on fresh data.
    kubectl_text("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=180s")
    deploy(settings, "ha")
    kafka = json.loads(kubectl_text("get", "statefulset", "kafka", "-n", NAMESPACE, "-o", "json"))
    assert kafka["status"]["readyReplicas"] == 3
    fleet = Fleet(service_url(settings, "ingest"), service_url(settings, "query"), tokens, "ha", 10)
    try:
        fleet.start()
        wait_for("reports flowing", lambda: all(fleet.state(r) for r in fleet.robots), 90)
        uid = pods()["kafka-1"]["metadata"]["uid"]
        kubectl_text("delete", "pod", "kafka-1", "-n", NAMESPACE, "--wait=false")
        time.sleep(10)  # the fleet keeps posting with a broker gone
        during = sum(len(s) for s in fleet.acked.values())

        def back() -> bool:
            pod = pods().get("kafka-1")
            return pod is not None and pod["metadata"]["uid"] != uid and ready(pod)

        wait_for("kafka-1 back", back, 240)
        time.sleep(3)
        fleet.stop()
        wait_for("every acknowledged report applied", fleet.all_applied, 180)
        assert during > 0 and fleet.refused <= 4, fleet.refused  # 2 of 3 brokers kept taking
    finally:
        fleet.close()
        kubectl_text("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=180s")
