"""`just rebuild-state` (python -m dataflows.republish) against the single-node stack:
with a running flow it completes and Redis converges; with none it says so and fails.
(The failover and FLUSHALL cases run on the HA stack, tests/integration/test_ha.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from deploy.local.harness import FlowProcess, encoded, isolated, produce, report, wait_until
from deploy.local.stack import Stack
from fleetpulse.schema import encode
from fleetpulse.settings import Settings, to_env
from state.connect import connect
from state.keys import Keys
from state.projection import Projection
from state.reader import RedisStateReader


def rebuild(s: Settings, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dataflows.republish", "--timeout", str(timeout_s)],
        env={**os.environ, **to_env(s)},
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
    )


def test_rebuild_state_without_a_flow_fails_saying_why(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(settings, tmp_path)
    done = rebuild(s, 1.5)
    assert done.returncode == 1
    assert "error: not re-published after 2s; is the dataflow running against this Redis" in (
        done.stderr
    )


def test_rebuild_state_puts_back_a_robot_whose_state_was_lost(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(settings, tmp_path)
    client = connect(s)
    reader = RedisStateReader(client, s)
    projection = Projection(client, s.redis_prefix)
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        produce(s, encoded([report(f"amr-{i}", seq) for seq in (1, 2, 3) for i in range(5)]))
        wait_until("5 robots at seq 3", lambda: reader.summary().total == 5, 60, [flow])
        wait_until("the first publish recorded", projection.published_to, 30, [flow])
        # Lose one robot's last write the way an asynchronous replica can: its hash
        # back at the version before (same status, site and online, so the counters
        # and indexes are as they were then too).
        keys = Keys(s.redis_prefix)
        newest = reader.get("amr-3")
        assert newest is not None and newest.report.seq == 3
        older = msgspec.structs.replace(
            newest, report=msgspec.structs.replace(newest.report, seq=2, battery=99.5)
        )
        client.hset(keys.robot("amr-3"), mapping={"seq": 2, "state": encode(older)})
        got = reader.get("amr-3")
        assert got is not None and got.report.seq == 2
        done = rebuild(s, 60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "asked the dataflow to re-publish its live state" in done.stdout
        assert "done: Redis" in done.stdout
        back = reader.get("amr-3")
        assert back == newest
        assert reader.summary().total == 5
        assert flow.alive()
    finally:
        flow.stop()
