"""The dataflow as a long-running process: offline detection, kill -9 recovery, a 2-process cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deploy.local.harness import (
    FlowProcess,
    Reporter,
    encoded,
    isolated,
    produce,
    report,
    wait_until,
)
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.schema import LiveState
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader


def _reader(s: Settings) -> RedisStateReader:
    return RedisStateReader(connect(s), s)


def test_silent_robot_goes_offline_once_and_comes_back(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(settings, tmp_path, offline_after_s=2.0)
    reader = _reader(s)
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        produce(s, encoded([report("amr-a", 0), report("amr-b", 0)]))
        wait_until("both robots online", lambda: reader.summary().online == 2, 60, [flow])
        for seq in range(1, 8):  # amr-a keeps reporting, amr-b is silent
            produce(s, encoded([report("amr-a", seq)]))
            time.sleep(0.5)
        silent_since = time.monotonic() - 3.5
        state = wait_until(
            "amr-b offline",
            lambda: (st := reader.get("amr-b")) is not None and not st.online and st,
            10,
            [flow],
        )
        assert isinstance(state, LiveState)
        # offline_after (2 s) + a margin for ticks and the sink: it went offline in time.
        assert time.monotonic() - silent_since < 2.0 + 5.0
        a = reader.get("amr-a")
        assert a is not None and a.online
        produce(s, encoded([report("amr-b", 1)]))
        wait_until(
            "amr-b back", lambda: (st := reader.get("amr-b")) is not None and st.online, 10, [flow]
        )
        kinds = [(x.kind, x.seq) for x in reader.alerts(robot_id="amr-b", limit=10)]
        assert sorted(kinds) == [("back_online", 1), ("offline", 0)]
        assert reader.summary().offline == 0
    finally:
        flow.stop()


def test_after_a_restart_silence_is_judged_by_arrivals_not_by_the_downtime(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # While the flow is down, three robots keep reporting and two fall silent. After the
    # restart, no offline storm: the three never went offline (their reports were in
    # Kafka all along); the two did, at their own deadline, not at the restart.
    s = isolated(settings, tmp_path, offline_after_s=4.0)
    reader = _reader(s)
    robots = [f"amr-g{i}" for i in range(5)]
    produce(s, encoded([report(r, 0) for r in robots[3:]]))  # then silent
    flow = FlowProcess(s, tmp_path / "a.log")
    with Reporter(s, robots[:3], 0.5) as talkers:
        try:
            wait_until("five robots online", lambda: reader.summary().online == 5, 60, [flow])
        finally:
            flow.stop()
        time.sleep(8.0)  # down for twice offline_after; three robots go on reporting
        restarted = time.time()
        flow = FlowProcess(s, tmp_path / "b.log")
        try:
            wait_until(
                "the two silent robots offline", lambda: reader.summary().offline == 2, 30, [flow]
            )
            at_restart = talkers.seq
            wait_until(
                "the reports sent while the flow was down",
                lambda: all(
                    (st := reader.get(r)) and st.report.seq >= at_restart for r in robots[:3]
                ),
                30,
                [flow],
            )
        finally:
            flow.stop()
    assert reader.summary().online == 3
    for r in robots[:3]:
        assert reader.alerts(robot_id=r, limit=10) == []
    for r in robots[3:]:
        [offline] = reader.alerts(robot_id=r, limit=10)
        assert offline.kind == "offline"
        # At its deadline on the arrival clock: during the downtime, not at the restart.
        assert offline.at.timestamp() < restarted


def _comparable(reader: RedisStateReader, robots: list[str]) -> dict[str, Any]:
    """What must match between runs (last_seen is processing time, so it cannot)."""
    out: dict[str, Any] = {}
    for robot in robots:
        st = reader.get(robot)
        assert st is not None, robot
        out[robot] = {
            "report": msgspec.to_builtins(st.report),
            "online": st.online,
            "status_since": st.status_since.isoformat(),
            "windows": msgspec.to_builtins(
                sorted(reader.stats(robot, limit=1000), key=lambda w: w.window_start)
            ),
            "history": [r.seq for r in reader.history(robot, limit=1000)],
        }
    alerts = reader.alerts(limit=1000)
    out["alerts"] = sorted(a.id for a in alerts)
    out["alerts_unique"] = len({a.id for a in alerts}) == len(alerts)
    out["summary"] = msgspec.to_builtins(reader.summary())
    return out


def _fleet_workload(robots: int, per_robot: int) -> list[dict[str, Any]]:
    out = []
    for seq in range(per_robot):
        for r in range(robots):
            battery = 60.0 - (seq % 200) * 0.25 if r % 3 else 90.0
            out.append(report(f"amr-{r:03d}", seq, battery=battery))
    return out


def _done(reader: RedisStateReader, robots: list[str], last_seq: int, windows: int) -> bool:
    for robot in robots:
        st = reader.get(robot)
        if st is None or st.report.seq != last_seq:
            return False
    return all(len(reader.stats(r, limit=1000)) >= windows for r in robots)


def test_kill9_midstream_then_restart_gives_the_uninterrupted_result(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    per_robot, n_robots = 300, 100
    base = isolated(settings, tmp_path, window_s=10, allowed_lateness_s=1.0, offline_after_s=600.0)
    robots = [f"amr-{r:03d}" for r in range(n_robots)]
    produce(base, encoded(_fleet_workload(n_robots, per_robot)))
    # 300 s of event time in 10 s windows; the last one closes on processing time.
    expect_windows = per_robot // 10

    # The uninterrupted run, into its own Redis prefix and recovery folder.
    ref = msgspec.structs.replace(
        base, redis_prefix=base.redis_prefix + "ref", recovery_dir=str(tmp_path / "ref")
    )
    ref_reader = _reader(ref)
    flow = FlowProcess(ref, tmp_path / "ref.log")
    try:
        wait_until(
            "the reference run",
            lambda: _done(ref_reader, robots, per_robot - 1, expect_windows),
            120,
            [flow],
        )
    finally:
        flow.stop()

    # The interrupted run: kill -9 as soon as the first states land, thousands still in flight.
    reader = _reader(base)
    flow = FlowProcess(base, tmp_path / "run1.log")
    wait_until("first states", lambda: reader.summary().total > 0, 60, [flow])
    flow.kill9()
    done_at_kill = sum(
        1 for r in robots if (st := reader.get(r)) is not None and st.report.seq == per_robot - 1
    )
    assert done_at_kill < n_robots, "the kill came too late to interrupt anything"
    assert any(Path(base.recovery_dir).glob("part-*")), "recovery partitions were not created"

    flow = FlowProcess(base, tmp_path / "run2.log")
    try:
        wait_until(
            "the resumed run",
            lambda: _done(reader, robots, per_robot - 1, expect_windows),
            120,
            [flow],
        )
    finally:
        flow.stop()

    got, want = _comparable(reader, robots), _comparable(ref_reader, robots)
    assert got["alerts_unique"] and want["alerts_unique"]
    assert got["alerts"] == want["alerts"]
    assert got["summary"] == want["summary"]
    for robot in robots:
        assert got[robot] == want[robot], robot


def test_two_process_cluster_matches_one_process(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    per_robot, n_robots = 120, 60
    base = isolated(settings, tmp_path, window_s=10, allowed_lateness_s=1.0, offline_after_s=600.0)
    robots = [f"amr-{r:03d}" for r in range(n_robots)]
    produce(base, encoded(_fleet_workload(n_robots, per_robot)))
    expect_windows = per_robot // 10

    one = msgspec.structs.replace(
        base, redis_prefix=base.redis_prefix + "one", recovery_dir=str(tmp_path / "one")
    )
    flow = FlowProcess(one, tmp_path / "one.log")
    try:
        wait_until(
            "one process",
            lambda: _done(_reader(one), robots, per_robot - 1, expect_windows),
            120,
            [flow],
        )
    finally:
        flow.stop()

    two = msgspec.structs.replace(
        base, redis_prefix=base.redis_prefix + "two", recovery_dir=str(tmp_path / "two")
    )
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    flows = [
        FlowProcess(two, tmp_path / f"two-{i}.log", ["-i", str(i), "-a", addresses]) for i in (0, 1)
    ]
    try:
        wait_until(
            "two processes",
            lambda: _done(_reader(two), robots, per_robot - 1, expect_windows),
            120,
            flows,
        )
    finally:
        for f in flows:
            f.stop()
    # (Stopping one process of a cluster makes its peer panic on shutdown; that is
    # Bytewax 0.21's cluster teardown, after all results were written and compared.)
    assert _comparable(_reader(two), robots) == _comparable(_reader(one), robots)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FLEETPULSE_OFFLINE_AFTER_S", "-1", "FLEETPULSE_OFFLINE_AFTER_S='-1' is not allowed"),
        ("FLEETPULSE_WINDOW_S", "abc", "FLEETPULSE_WINDOW_S='abc' is not allowed"),
        ("FLEETPULSE_BATTERY_OK_PCT", "10", "FLEETPULSE_BATTERY_OK_PCT"),
    ],
)
def test_bad_dataflow_settings_stop_start_up_with_a_clear_message(
    tmp_path: Path, settings: Settings, variable: str, value: str, message: str
) -> None:
    s = msgspec.structs.replace(settings, recovery_dir=str(tmp_path / "r"))
    flow = FlowProcess(s, tmp_path / "bad.log", extra_env={variable: value})
    flow.proc.wait(60)
    flow.stop()
    assert flow.proc.returncode != 0
    assert message in flow.output()
