"""The container images and the seed's compose topology, built and run here with podman.

One test, in the order a user meets it: the images are built (cached layer by layer in
the stack folder; the first build is minutes, later ones seconds), the compose file
(deploy/docker-compose-local.yml) comes up on ports of its own under a project of its
own, reports posted to the ingest container are read back from the query container,
the trace of one of them is found in the Jaeger container, the dataflow is crashed
(its main process killed with SIGKILL from outside, as the kernel's OOM killer would)
and resumes from its recovery volumes, and at the end nothing of the project is left:
no container, pod or volume.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis

from api.auth import new_token
from deploy.containers import Compose, _redis_users, build_images, compose_environ
from deploy.local.harness import metric_total, wait_until
from fleetpulse.settings import Settings

pytestmark = [pytest.mark.containers, pytest.mark.timeout(2400)]

# Below Linux's ephemeral range and apart from the local stack (59092..), the HA tests
# (29xxx, 26479) and the defaults, so a developer's own compose project may run meanwhile.
PORTS = {
    "kafka_port": 28092,
    "kafka_controller_port": 28093,
    "redis_port": 28379,
    "jaeger_query_port": 28686,
    "jaeger_query_grpc_port": 28685,
    "jaeger_otlp_grpc_port": 28317,
    "jaeger_otlp_http_port": 28318,
    "ingest_port": 28081,
    "query_port": 28080,
    "dashboard_port": 28082,
    "dataflow_metrics_port": 28464,
    "notify_metrics_port": 28474,
}
PEERS = {"FLOW_PEER_PORT_0": "28090", "FLOW_PEER_PORT_1": "28091"}
ROBOTS = [f"ctr-{i:02d}" for i in range(20)]


def _report(robot: str, seq: int) -> dict[str, Any]:
    return {
        "robot_id": robot,
        "boot": 0,
        "seq": seq,
        "ts": datetime.now(UTC).isoformat(),
        "status": "moving",
        "battery": 90.0 - seq,
        "pose": {"x": float(seq), "y": 1.0, "theta": 0.0},
        "speed": 0.5,
        "errors": [],
        "site": "plant-c",
    }


def _processed(metrics_ports: list[int]) -> float:
    """Reports the dataflow's processes handled since they started (applied or dropped as
    stale or duplicate), summed over both processes."""
    return sum(
        metric_total(metrics_ports, name)
        for name in (
            "fleetpulse_flow_reports_applied_total",
            "fleetpulse_flow_reports_stale_total",
            "fleetpulse_flow_reports_duplicate_total",
        )
    )


def test_images_and_compose_topology_round_trip_crash_and_teardown(settings: Settings) -> None:
    images = build_images(settings)
    assert {i.name for i in images} == {
        "fleetpulse",
        "fleetpulse-kafka",
        "fleetpulse-redis",
        "fleetpulse-jaeger",
    }

    # The test's reports bring a sampled traceparent: its ingest token is trusted with it.
    s = msgspec.structs.replace(settings, **PORTS, trace_trust="ingest,admin")
    tokens = {scope: new_token() for scope in ("read", "ingest", "admin")}
    project = f"fptest{os.getpid()}"
    users = _redis_users(s, project)  # as `just compose-up` makes them
    compose = Compose(
        s,
        project=project,
        environ={**compose_environ(s, tokens, users, project), **PEERS},
    )
    metrics_ports = [s.dataflow_metrics_port, s.dataflow_metrics_port + 1]
    before = compose.podman.inventory()
    ingest = httpx.Client(
        base_url=f"http://127.0.0.1:{s.ingest_port}",
        headers={"Authorization": f"Bearer {tokens['ingest']}"},
        timeout=10,
    )
    query = httpx.Client(
        base_url=f"http://127.0.0.1:{s.query_port}",
        headers={"Authorization": f"Bearer {tokens['read']}"},
        timeout=10,
    )
    try:
        compose.up()
        # Every service runs in a container of the project, as the user it was built with.
        running = {c["Labels"]["com.docker.compose.service"] for c in compose.containers()}
        assert running == {
            "kafka",
            "redis",
            "jaeger",
            "topics",
            "webhook-server",
            "api-server",
            "dashboard",
            "dataflow-0",
            "dataflow-1",
            "notifier",
        }
        for service, user in (("webhook-server", "10001:10001"), ("kafka", "10002:10002")):
            assert compose.inspect(service)["Config"]["User"] == user
        # Least privilege in the redis container: `default` may only PING, the reader
        # only read, the writer only its commands on the product's keys.
        anonymous = redis.Redis(port=s.redis_port)
        assert anonymous.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.get("fp:summary")
        reader = redis.Redis(
            port=s.redis_port, username=users.reader, password=users.reader_password
        )
        writer = redis.Redis(
            port=s.redis_port, username=users.writer, password=users.writer_password
        )
        assert reader.exists("fp:summary") in (0, 1) and writer.exists("fp:summary") in (0, 1)
        for refused in (lambda: reader.hset("fp:x", "a", "1"), writer.flushall, writer.config_get):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        for client in (anonymous, reader, writer):
            client.close()

        # Reports through the ingest container, read back from the query container.
        trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
        for seq in (1, 2, 3):
            for robot in ROBOTS:
                headers = {}
                if robot == ROBOTS[0] and seq == 1:  # this one is traced (sampled by us)
                    headers["traceparent"] = f"00-{trace_id}-{parent}-01"
                r = ingest.post("/v1/reports", json=_report(robot, seq), headers=headers)
                assert r.status_code == 202, r.text

        def all_at(seq: int) -> bool:
            for robot in ROBOTS:
                r = query.get(f"/v1/robots/{robot}")
                if r.status_code != 200 or r.json()["report"]["seq"] != seq:
                    return False
            return True

        wait_until("every robot at seq 3 through the query container", lambda: all_at(3), 90)
        state = query.get(f"/v1/robots/{ROBOTS[5]}").json()
        assert state["report"]["battery"] == 87.0 and state["report"]["site"] == "plant-c"
        assert state["online"] is True
        summary = query.get("/v1/fleet/summary").json()
        assert summary["total"] == len(ROBOTS)
        history = query.get(f"/v1/robots/{ROBOTS[5]}/history").json()
        assert sorted(h["seq"] for h in history["items"]) == [1, 2, 3]

        # The trace of the first report, from the ingest request to the Redis write, in
        # the Jaeger container.
        jaeger = f"http://127.0.0.1:{s.jaeger_query_port}"

        def trace() -> dict[str, Any] | None:
            data = httpx.get(f"{jaeger}/api/traces/{trace_id}", timeout=5).json().get("data")
            return data[0] if data and len(data[0]["spans"]) >= 4 else None

        found = wait_until("the traced report's 4 spans in Jaeger", trace, 60)
        names = {sp["operationName"] for sp in found["spans"]}
        assert {"POST /v1/reports", f"produce {s.topic_reports}", "process report"} <= names
        assert "redis write" in names
        services = {p["serviceName"] for p in found["processes"].values()}
        assert services == {"fleetpulse-ingest", "fleetpulse-dataflow"}

        # The example alert rules are mounted: an e-stop opens an incident at once, listed
        # by the query container; the notifier container serves its metrics.
        estop = {**_report(ROBOTS[1], 4), "status": "estop"}
        assert ingest.post("/v1/reports", json=estop).status_code == 202

        def incident() -> list[Any] | None:
            found = query.get("/v1/incidents", params={"rule": "estop"}).json()["items"]
            return found or None

        [opened] = wait_until("the e-stop's incident", incident, 60)
        assert (opened["robot_id"], opened["opened_by"]) == (ROBOTS[1], [0, 4])
        notify = httpx.get(f"http://127.0.0.1:{s.notify_metrics_port}/metrics", timeout=5)
        assert notify.status_code == 200 and "fleetpulse_notify_sent" in notify.text

        # The dashboard container: its page, and its pipeline panel's figures read from
        # the ingest container and both dataflow containers.
        board = f"http://127.0.0.1:{s.dashboard_port}"
        page = httpx.get(f"{board}/", timeout=5)
        assert page.status_code == 200 and '<canvas id="map">' in page.text
        assert httpx.get(f"{board}/ui/dashboard.js", timeout=5).status_code == 200
        pipeline = httpx.get(f"{board}/v1/dashboard/pipeline", headers=query.headers, timeout=10)
        figures = pipeline.json()
        assert [(t["role"], t["up"]) for t in figures["targets"]] == [
            ("ingest", True), ("dataflow", True), ("dataflow", True),
        ], figures  # fmt: skip
        assert figures["accepted_total"] >= 3 * len(ROBOTS)
        traced = httpx.get(f"{board}/v1/traces/{trace_id}", headers=query.headers, timeout=10)
        assert [sp["name"] for sp in traced.json()["spans"]] == [
            "POST /v1/reports", f"produce {s.topic_reports}", "process report", "redis write",
        ]  # fmt: skip

        # Crash the dataflow: SIGKILL its process 0 from outside. The cluster runs whole
        # or not at all, so process 1 exits too; both are restarted (restart: on-failure)
        # and resume from their recovery volumes, not from the start of the topic.
        wait_until(
            "all 60 reports counted by the dataflow",
            lambda: _processed(metrics_ports) >= 3 * len(ROBOTS),
            60,
        )
        time.sleep(3 * s.snapshot_interval_s + 2)  # a checkpoint past every report
        restarts = {sv: compose.inspect(sv)["RestartCount"] for sv in ("dataflow-0", "dataflow-1")}
        os.kill(compose.main_pid("dataflow-0"), signal.SIGKILL)

        def restarted() -> bool:
            for service in ("dataflow-0", "dataflow-1"):
                info = compose.inspect(service)
                if info["RestartCount"] <= restarts[service] or not info["State"]["Running"]:
                    return False
            return True

        wait_until("both dataflow containers restarted", restarted, 120)
        for service in ("dataflow-0", "dataflow-1"):
            compose.wait_ready(service, 120)
        assert "partitions in /var/lib/fleetpulse/recovery" in compose.logs("dataflow-0", 400)

        for robot in ROBOTS:
            assert ingest.post("/v1/reports", json=_report(robot, 4)).status_code == 202
        wait_until("every robot at seq 4 after the crash", lambda: all_at(4), 120)
        # Resumed from the checkpoint: the restarted processes handled the 20 new
        # reports only; started over, they would have read all 80 again.
        wait_until("the new reports counted", lambda: _processed(metrics_ports) >= len(ROBOTS), 30)
        assert _processed(metrics_ports) == len(ROBOTS)
        assert query.get("/v1/fleet/summary").json()["total"] == len(ROBOTS)
    finally:
        ingest.close()
        query.close()
        compose.down(volumes=True)
        for made in Path(s.stack_dir, "containers").glob(f"{project}.*"):
            made.unlink()  # this project's users and ACL file
    assert compose.leftovers() == {"containers": [], "pods": [], "volumes": []}
    # Nothing else either: no anonymous volume, no pod of another name.
    after = compose.podman.inventory()
    assert {kind: after[kind] - before[kind] for kind in after} == {
        "containers": set(),
        "pods": set(),
        "volumes": set(),
    }
