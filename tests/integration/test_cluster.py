"""The main job's dataflow layout: 2 processes run, fail and stop as one unit."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import msgspec

from deploy.local.harness import FlowProcess, isolated, produce, report, wait_until
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_two_processes_share_the_work_and_one_crash_stops_both(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(settings, tmp_path)
    robots = [f"amr-{i:03d}" for i in range(40)]
    produce(s, ((r.encode(), msgspec.json.encode(report(r, 1))) for r in robots))
    log = tmp_path / "cluster.log"
    cluster = FlowProcess(s, log, processes=2)  # the main job's layout
    try:
        reader = RedisStateReader(connect(s), s)
        wait_until("all robots in Redis", lambda: reader.summary().total == 40, 90)
        members = _children(cluster.proc.pid)
        assert len(members) == 2, log.read_text(errors="replace")
        # Both processes started with recovery on (one made the partitions).
        assert log.read_text().count("recovery on, partitions in") == 2

        os.kill(members[1], signal.SIGKILL)
        code = cluster.proc.wait(30)
        assert code == 128 + signal.SIGKILL, log.read_text(errors="replace")
        assert not any(_alive(pid) for pid in members), "a cluster member outlived the crash"
        assert "process 1 exited with -9; stopping the others" in log.read_text()

        # The same command resumes from the checkpoint: the robots are still there and
        # new reports are applied.
        cluster.stop()  # already exited: closes its log
        cluster = FlowProcess(s, log, processes=2)
        produce(s, ((r.encode(), msgspec.json.encode(report(r, 2))) for r in robots))
        wait_until(
            "the second reports applied after the restart",
            lambda: all((st := reader.get(r)) and st.report.seq == 2 for r in robots),
            90,
        )
        cluster.proc.send_signal(signal.SIGINT)
        assert cluster.proc.wait(30) == 0
    finally:
        cluster.stop()
