"""The fleet dataflow against real Kafka and Redis, in-process (1 and 2 workers)."""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main, run_main

from dataflows.fleet import build_flow
from deploy.local.harness import BASE_TS, encoded, isolated, produce, report
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader
from tests.integration.kafka_util import consume_all

RUNNERS: dict[str, Callable[[Dataflow], None]] = {
    "run_main": run_main,
    "cluster_main-2-workers": lambda flow: cluster_main(flow, [], 0, worker_count_per_proc=2),
}


@pytest.fixture(params=sorted(RUNNERS))
def runner(request: pytest.FixtureRequest) -> Callable[[Dataflow], None]:
    return RUNNERS[request.param]


def _workload(robots: int, per_robot: int, rng: random.Random) -> list[dict[str, Any]]:
    """Each robot's reports in (boot, seq) order, with duplicates and stale re-sends mixed in."""
    out = []
    for r in range(robots):
        rid = f"amr-{r}"
        sent = []
        for seq in range(per_robot):
            sent.append(report(rid, seq, battery=50.0 + 40 * math.sin(seq / 7 + r)))
            if rng.random() < 0.1 and sent:
                sent.append(rng.choice(sent))  # a duplicate or an older, stale report
        out += sent
    return out


def test_live_state_windows_and_dlq(
    stack: Stack, settings: Settings, tmp_path: Path, runner: Callable[[Dataflow], None]
) -> None:
    s = isolated(settings, tmp_path, window_s=10, allowed_lateness_s=0.0)
    rng = random.Random(7)
    reports = _workload(50, 60, rng)
    poison: list[tuple[bytes | None, bytes]] = [
        (b"amr-1", b"not json"),
        (None, b"{}"),
        (b"amr-2", msgspec.json.encode(report("amr-2", 5, battery=101))),
        (b"amr-3", msgspec.json.encode(report("amr-4", 5))),  # key and robot_id differ
        (b"bad key{", msgspec.json.encode(report("amr-5", 5))),
    ]
    produce(s, encoded(reports[:1000]) + poison + encoded(reports[1000:]))

    runner(build_flow(s, tail=False))

    reader = RedisStateReader(connect(s), s)
    for r in range(50):
        state = reader.get(f"amr-{r}")
        assert state is not None
        assert (state.report.boot, state.report.seq) == (0, 59)
        assert state.online
        expected = report(f"amr-{r}", 59, battery=50.0 + 40 * math.sin(59 / 7 + r))
        assert state.report.battery == expected["battery"]
    summary = reader.summary()
    assert (summary.total, summary.online, summary.by_status["moving"]) == (50, 50, 50)
    robots, cursor = reader.list_robots(limit=100)
    assert cursor is None and len(robots) == 50

    # Closed 10 s windows: each robot's seq 0..59 at one report per second -> six windows;
    # the watermark (newest event - 0 s) closes the first five.
    stats = sorted(reader.stats("amr-3", limit=100), key=lambda w: w.window_start)
    assert [int(w.window_start.timestamp()) - BASE_TS for w in stats][:5] == [0, 10, 20, 30, 40]
    first = stats[0]
    batteries = [50.0 + 40 * math.sin(seq / 7 + 3) for seq in range(10)]
    assert first.count == 10
    assert first.battery_min == min(batteries) and first.battery_max == max(batteries)
    assert first.battery_avg == pytest.approx(sum(batteries) / 10)
    assert first.distance_m == pytest.approx(4.5)  # 9 steps of 0.5 m, in seq order
    assert first.max_speed == 0.5

    # A report is late when its 10 s window's end is at or below its robot's watermark at
    # its arrival (dataflows.windows): watermark = arrival + the largest ts - arrival seen
    # (0 s lateness), arrival being the Kafka append time. Read from the log itself, as
    # the flow does: a slow produce spreads the arrivals, and later ones see a higher
    # watermark than an instant one would.
    robots = {f"amr-{r}" for r in range(50)}
    offsets: dict[str, float] = {}
    resent_late = 0
    for m in consume_all(s, s.topic_reports, expect=len(reports) + len(poison)):
        try:
            body = json.loads(m.value())
        except ValueError:
            continue
        key = (m.key() or b"").decode(errors="replace")
        if key not in robots or body.get("robot_id") != key or body.get("battery", 0) > 100:
            continue  # the dead letters above
        arrival = m.timestamp()[1] / 1000
        ts = datetime.fromisoformat(body["ts"]).timestamp()
        offsets[key] = max(offsets.get(key, -math.inf), ts - arrival)
        end = math.floor(ts / 10) * 10 + 10
        resent_late += end - offsets[key] <= arrival
    everything = consume_all(s, s.topic_dlq, expect=5 + resent_late)
    late = [m for m in everything if dict(m.headers())["reason"].startswith(b"late:")]
    dead = [m for m in everything if not dict(m.headers())["reason"].startswith(b"late:")]
    # Re-sent old reports whose window had closed are routed as late (lateness 0 s here).
    assert len(late) == resent_late > 0
    assert len(dead) == 5
    reasons = sorted(dict(m.headers())["reason"].decode().split(":")[0] for m in dead)
    assert reasons == sorted(
        [
            "invalid report",
            "message key is not a robot id",
            "invalid report",
            "key 'amr-3' does not match robot_id 'amr-4'",
            "message key is not a robot id",
        ]
    )
    for m in dead:
        headers = dict(m.headers())
        assert headers["source_topic"] == s.topic_reports.encode()
        assert int(headers["source_partition"]) in range(12)
        assert int(headers["source_offset"]) >= 0


def test_alerts_are_written_once_and_sent_to_kafka(
    stack: Stack, settings: Settings, tmp_path: Path, runner: Callable[[Dataflow], None]
) -> None:
    s = isolated(settings, tmp_path)
    seq_battery = [(0, 50.0), (1, 19.0), (2, 18.0), (3, 22.0), (4, 26.0), (5, 15.0)]
    reports = [report("amr-b", seq, battery=b) for seq, b in seq_battery]
    reports.append(report("amr-e", 0, status="estop"))
    reports.append(report("amr-e", 1, status="estop"))
    reports.append(report("amr-x", 0, status="error", errors=["lidar: timeout"]))
    produce(s, encoded(reports + reports))  # everything twice: duplicates must not re-alert

    runner(build_flow(s, tail=False))

    reader = RedisStateReader(connect(s), s)
    kinds = sorted((a.robot_id, a.kind, a.seq) for a in reader.alerts(limit=100))
    assert kinds == [
        ("amr-b", "battery_ok", 4),
        ("amr-b", "low_battery", 1),
        ("amr-b", "low_battery", 5),
        ("amr-e", "estop", 0),
        ("amr-x", "error", 0),
    ]
    sent = consume_all(s, s.topic_alerts, expect=5)
    assert sorted(dict(m.headers())["alert_id"].decode() for m in sent) == sorted(
        a.id for a in reader.alerts(limit=100)
    )


def test_late_reports_are_counted_and_routed_not_lost(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(settings, tmp_path, window_s=10, allowed_lateness_s=2.0)
    reports = [report("amr-l", seq) for seq in range(40)]
    late = report("amr-l", 40, t=3)  # newest by seq, but its event time is 37 s in the past
    produce(s, encoded([*reports, late]))

    run_main(build_flow(s, tail=False))

    reader = RedisStateReader(connect(s), s)
    state = reader.get("amr-l")
    assert state is not None and state.report.seq == 40  # live state is order, not time
    (dead,) = consume_all(s, s.topic_dlq, expect=1)
    assert dict(dead.headers())["reason"].decode().startswith("late: event time")
    assert msgspec.json.decode(dead.value())["seq"] == 40
    first = min(reader.stats("amr-l", limit=10), key=lambda w: w.window_start)
    assert first.count == 10  # the late report did not sneak into the closed window


def test_unknown_robot_and_empty_store(stack: Stack, settings: Settings) -> None:
    s = msgspec.structs.replace(settings, redis_prefix=f"t{uuid.uuid4().hex[:8]}")
    reader = RedisStateReader(connect(s), s)
    assert reader.get("amr-none") is None
    assert reader.summary().total == 0
