"""The main job end to end: 10 simulated robots through the whole pipeline, bounded in time.

Checked through the query API: every robot has live state, the summary adds up, the robot
the simulator silenced went offline and came back, windows were written, and Jaeger holds
traces from the ingest and dataflow services. Ctrl-C then stops what the job started and
leaves the stack it found running alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from deploy.local.harness import isolated, wait_until
from deploy.local.procs import free_port, port_in_use
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, to_env


def test_main_job_runs_ten_robots_through_the_pipeline(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(
        settings,
        tmp_path,
        offline_after_s=3.0,
        window_s=5,
        allowed_lateness_s=0.5,
        trace_sample_ratio=1.0,
        ingest_port=free_port(),
        query_port=free_port(),
        dashboard_port=free_port(),
        dataflow_metrics_port=free_port(2),  # process 1 on the next port
    )
    env = {**os.environ, **to_env(s)}
    started = time.time()
    out_path = tmp_path / "main.out"
    cleanup: list[Any] = []
    with out_path.open("wb") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "deploy.local.main", "--robots", "10", "--rate", "2",
             "--", "--silence", "amr-003:6:7", "--seed", "7", "--estop-prob", "0.02"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        output = lambda: out_path.read_text(errors="replace")  # noqa: E731
        match = wait_until(
            "the main job to print where to look",
            lambda: re.search(r"read: (fp_\S+)", output()) or (job.poll() is not None and output()),
            120,
        )
        assert isinstance(match, re.Match), f"the main job ended early:\n{output()}"
        assert "redis-cli -p" in output() and "/api/traces?service=" in output()
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{s.query_port}",
            headers={"Authorization": f"Bearer {match.group(1)}"},
            timeout=5,
        )
        cleanup.append(api.close)

        def robots() -> list[dict[str, Any]] | None:
            page = api.get("/v1/robots", params={"limit": 100}).json()
            return page["items"] if len(page["items"]) == 10 else None

        wait_until("10 robots with live state", robots, 60)

        def came_back() -> list[str] | None:
            alerts = api.get("/v1/alerts", params={"robot_id": "amr-003", "limit": 50}).json()
            kinds = [a["kind"] for a in alerts["items"]]
            return kinds if "offline" in kinds and "back_online" in kinds else None

        kinds = wait_until("amr-003 offline, then back online", came_back, 60)
        assert kinds.count("offline") == kinds.count("back_online") == 1
        state = api.get("/v1/robots/amr-003").json()
        assert state["online"] is True

        def windows() -> list[Any] | None:
            items = api.get("/v1/robots/amr-000/stats").json()["items"]
            return items or None

        stats = wait_until("closed windows for amr-000", windows, 60)
        assert all(w["count"] >= 1 for w in stats)

        listed = robots()
        assert listed is not None
        summary = api.get("/v1/fleet/summary").json()
        assert summary["total"] == 10
        assert summary["online"] + summary["offline"] == 10
        assert sum(summary["by_status"].values()) == 10
        by_status: dict[str, int] = {}
        for r in listed:
            by_status[r["report"]["status"]] = by_status.get(r["report"]["status"], 0) + 1
        assert {k: v for k, v in summary["by_status"].items() if v} == by_status

        def traced(service: str) -> bool:
            r = httpx.get(
                f"{s.jaeger_api}/api/traces",
                params={"service": service, "start": int(started * 1e6), "limit": 5},
                timeout=5,
            )
            return bool(r.json().get("data"))

        # The example alert rules are in force: an e-stop opens an incident at once.
        assert "alert rules" in output() and "rules.yaml" in output()

        def estop_incident() -> list[Any] | None:
            found = api.get("/v1/incidents", params={"rule": "estop"}).json()["items"]
            return found or None

        incidents = wait_until("an estop incident", estop_incident, 60)
        assert incidents[0]["severity"] == "critical"
        assert incidents[0]["robot_id"].startswith("amr-")

        wait_until("ingest traces in Jaeger", lambda: traced("fleetpulse-ingest"), 30)
        wait_until("dataflow traces in Jaeger", lambda: traced("fleetpulse-dataflow"), 30)
    finally:
        for close in cleanup:
            close()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGINT)
        job.wait(60)
    text = out_path.read_text(errors="replace")
    assert job.returncode == 0, text
    for name in ("simulator", "notifier", "dashboard", "query", "ingest", "dataflow"):
        assert f"{name:9} stopped" in text
    for port in (s.ingest_port, s.query_port, s.dashboard_port, s.dataflow_metrics_port):
        assert not port_in_use(port), f"port {port} still in use after the main job stopped"
    assert all(row.healthy for row in stack.status()), "the stack it found was stopped"
