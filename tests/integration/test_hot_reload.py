"""A ConfigMap change reaches the running dataflow without a restart (the seed's check).

The flow runs as users run it, its config folder laid out and updated as the kubelet
does (``tests.configmap``); reports go straight to Kafka under steady load, alerts are
read from Redis and the active config from the flow's own /metrics.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.auth import hash_token, new_token
from deploy.local.harness import FlowProcess, encoded, isolated, produce, report, wait_until
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.reload import config_hash
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader
from tests.configmap import ConfigMap

ROBOTS = [f"hot-{i}" for i in range(4)]
INGEST = new_token()


class _Load:
    """The robots report battery 40 % every 0.2 s until stopped; ``seq`` is the newest sent."""

    def __init__(self, s: Settings) -> None:
        self.s, self.seq = s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seq += 1
            produce(self.s, encoded(report(r, self.seq, battery=40.0) for r in ROBOTS))
            self._stop.wait(0.2)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _parse(text: str) -> tuple[set[str], dict[str, float]]:
    hashes: set[str] = set()
    reloads: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fleetpulse_config_info" and sample.value == 1:
                hashes.add(sample.labels["hash"])
            elif sample.name == "fleetpulse_config_reloads_total":
                reloads[sample.labels["result"]] = sample.value
    return hashes, reloads


def _config(url: str) -> tuple[set[str], dict[str, float]] | None:
    """The flow's active config hashes and its reload counts, or None while it has no /metrics."""
    try:
        return _parse(httpx.get(url, timeout=2).text)
    except httpx.HTTPError:
        return None


def test_a_configmap_update_changes_the_running_flows_thresholds(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    configmap = ConfigMap(tmp_path / "config")
    configmap.write("low_battery_pct: 20\nbattery_ok_pct: 25\n")
    port = free_port()
    s = isolated(
        settings,
        tmp_path,
        config_dir=str(configmap.root),
        dataflow_metrics_port=port,
        offline_after_s=600.0,
    )
    reader = RedisStateReader(connect(s), s)
    url = f"http://127.0.0.1:{port}/metrics"
    before = config_hash(msgspec.structs.replace(s, low_battery_pct=20.0, battery_ok_pct=25.0))
    after = config_hash(msgspec.structs.replace(s, low_battery_pct=50.0, battery_ok_pct=55.0))
    flow = FlowProcess(s, tmp_path / "flow.log")

    def low_battery() -> list[str]:
        return sorted({a.robot_id for a in reader.alerts(kind="low_battery", limit=100)})

    def seq_of_all() -> int:
        states = [reader.get(r) for r in ROBOTS]
        return min(st.report.seq if st is not None else 0 for st in states)

    try:
        with _Load(s):
            # Under 20 / 25 a battery of 40 % is fine.
            wait_until("every robot's reports applied", lambda: seq_of_all() >= 5, 40, [flow])
            assert low_battery() == []
            calm = seq_of_all()  # applied under 20 / 25 without an alert
            assert _config(url) == (
                {before},
                {"applied": 0.0, "invalid": 0.0, "unchanged": 0.0},
            )

            configmap.write("low_battery_pct: 50\nbattery_ok_pct: 55\n")
            wait_until("low_battery for every robot", lambda: low_battery() == ROBOTS, 15, [flow])
            # Raised by reports applied after the swap, never by the ones before it.
            assert all(a.seq > calm for a in reader.alerts(kind="low_battery", limit=100))
            assert wait_until(
                "the new hash on /metrics", lambda: (c := _config(url)) and c[0] == {after} and c, 5
            ) == ({after}, {"applied": 1.0, "invalid": 0.0, "unchanged": 0.0})

            configmap.write("low_battery_pct: 50\nbattery_ok_pct: 45\n")  # a bad pair
            wait_until(
                "the bad file counted invalid",
                lambda: (c := _config(url)) and c[1]["invalid"] == 1.0,
                10,
                [flow],
            )
            # The flow keeps running under the last good config.
            seq = seq_of_all()
            wait_until("reports still applied", lambda: seq_of_all() >= seq + 3, 10, [flow])
            assert _config(url) == (
                {after},
                {"applied": 1.0, "invalid": 1.0, "unchanged": 0.0},
            )
        assert flow.alive()
        assert len(reader.alerts(kind="low_battery", limit=100)) == len(ROBOTS)  # once each
    finally:
        flow.stop()
    log = flow.log.read_text(errors="replace")  # all of it: output() is its tail
    assert f"config {after} applied" in log
    assert "battery_ok_pct (45) must be above low_battery_pct (50)" in log
    assert f"config {after} stays" in log


def test_a_configmap_update_changes_the_ingest_time_bounds_and_readyz(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    configmap = ConfigMap(tmp_path / "config")
    configmap.write("max_future_s: 600\n")
    s = isolated(
        settings,
        tmp_path,
        config_dir=str(configmap.root),
        api_tokens=f"ingest:{hash_token(INGEST)}",
    )
    ahead = report("hot-api", 1, ts=datetime.fromtimestamp(time.time() + 300, UTC).isoformat())
    after = config_hash(msgspec.structs.replace(s, max_future_s=60.0))

    def post(client: TestClient[Any], body: dict[str, Any]) -> int:
        return client.post("/v1/reports", json=body).status_code

    with TestClient(create_app(s, query=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {INGEST}"
        first = client.get("/readyz").json()["config"]
        assert first == config_hash(msgspec.structs.replace(s, max_future_s=600.0))
        assert post(client, ahead) == 202  # 5 min ahead, 10 allowed

        configmap.write("max_future_s: 60\n")
        wait_until(
            "readyz shows the new config",
            lambda: client.get("/readyz").json()["config"] == after,
            5,
        )
        r = client.post("/v1/reports", json=ahead)
        assert r.status_code == 422 and "ts" in r.json()["fields"]
        batch = client.post("/v1/reports/batch", json=[ahead])
        assert (batch.status_code, batch.json()["fields"]) == (422, ["[0].ts"])
        assert _parse(client.get("/metrics").text) == (
            {after},
            {"applied": 1.0, "invalid": 0.0, "unchanged": 0.0},
        )
