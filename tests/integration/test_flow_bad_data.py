"""Whatever reaches the reports topic, the running dataflow survives it (real Kafka, Redis).

Producers other than ingest exist, so these reports go straight to Kafka, past the
checks at the door: times from year 1 to 9999, every bound of every number, a report
from the far future, a robot clock that jumps back.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy.local.harness import FlowProcess, encoded, isolated, produce, report, wait_until
from deploy.local.stack import Stack
from fleetpulse.schema import WindowStats
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader
from tests.integration.kafka_util import consume_all


def _reader(s: Settings) -> RedisStateReader:
    return RedisStateReader(connect(s), s)


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat()


def _now_report(robot: str, seq: int, *, ahead_s: float = 0.0, **over: Any) -> dict[str, Any]:
    """A report stamped with the wall clock (plus ``ahead_s``), as a live robot sends it."""
    return report(robot, seq, ts=_iso(time.time() + ahead_s), **over)


def _dead_kinds(s: Settings, expect: int) -> dict[str, list[str]]:
    """DLQ messages by kind -> their keys."""
    out: dict[str, list[str]] = {}
    for m in consume_all(s, s.topic_dlq, expect=expect):
        headers = dict(m.headers() or [])
        out.setdefault(headers["kind"].decode(), []).append((m.key() or b"").decode())
    return out


def test_reports_from_any_time_and_every_bound_never_stop_the_flow(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Regression: a report dated 9999-12-31T23:59:30Z killed the flow ~70 s later (year
    # 10000 closing its window) and again after every restart, from the snapshot.
    s = isolated(settings, tmp_path, window_s=2, allowed_lateness_s=0.5, offline_after_s=600.0)
    reader = _reader(s)
    longest = "r" + "x" * 63
    extreme = _now_report(
        longest,
        2**53,
        boot=2**53,
        battery=0.0,
        speed=1000.0,
        pose={"x": -1e9, "y": 1e9, "theta": -1e6},
        errors=["e" * 64] * 16,
        site="s" * 64,
    )
    poison = [
        report("far-1", 0, ts="9999-12-31T23:59:30Z"),
        report("far-2", 0, ts="0001-01-01T00:00:30+01:00"),
        report("ok-1", 1, ts="9999-12-31T23:59:59.999999-23:59"),
        report("ok-1", 2, ts="0001-01-01T00:00:00+23:59"),
        extreme,
    ]
    flow = FlowProcess(s, tmp_path / "a.log")
    try:
        produce(s, encoded([_now_report("ok-1", 0)]))
        wait_until("ok-1 applied", lambda: reader.get("ok-1"), 60, [flow])
        produce(s, encoded(poison))
        # Fresh reports keep landing and keep closing windows for well over a window.
        for seq in range(3, 23):
            produce(s, encoded([_now_report("ok-1", seq), _now_report(longest, seq, boot=2**53)]))
            time.sleep(0.25)
        wait_until(
            "ok-1 at seq 22 with closed windows",
            lambda: (
                (st := reader.get("ok-1")) is not None
                and st.report.seq == 22
                and reader.stats("ok-1")
            ),
            30,
            [flow],
        )
        assert reader.get("far-1") is None and reader.get("far-2") is None
        top = reader.get(longest)
        assert top is not None and top.report.seq == 2**53 and top.report.boot == 2**53
        assert top.report.errors == ["e" * 64] * 16
        wait_until("windows of the extreme robot", lambda: reader.stats(longest), 30, [flow])
    finally:
        flow.kill9()
    kinds = _dead_kinds(s, expect=4)
    assert sorted(kinds["future"]) == ["far-1", "ok-1"]
    assert sorted(kinds["past"]) == ["far-2", "ok-1"]
    assert "error" not in kinds

    # Restarted from its snapshot (which saw all of it), it runs on.
    flow = FlowProcess(s, tmp_path / "b.log")
    try:
        produce(s, encoded([_now_report("ok-1", 23)]))
        wait_until(
            "ok-1 at seq 23 after the restart",
            lambda: (st := reader.get("ok-1")) is not None and st.report.seq == 23,
            60,
            [flow],
        )
        time.sleep(3 * s.window_s)  # past every window the poison could have opened
        assert flow.alive(), flow.output()
    finally:
        flow.stop()


def test_one_far_future_report_does_not_hide_a_robots_statistics(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Regression: the per-robot watermark followed the largest event time and never went
    # back, so after one report dated a day ahead every normal report was late.
    s = isolated(settings, tmp_path, window_s=2, allowed_lateness_s=0.5, offline_after_s=600.0)
    reader = _reader(s)
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        produce(s, encoded([_now_report("fut-1", 0), _now_report("fut-1", 1, ahead_s=86_400)]))
        started = time.time()
        for seq in range(2, 30):
            produce(s, encoded([_now_report("fut-1", seq)]))
            time.sleep(0.25)

        def after_it() -> list[WindowStats]:
            windows = reader.stats("fut-1", limit=100)
            return [w for w in windows if w.window_start.timestamp() >= started]

        # 28 reports after it, 2 s windows: all but those of the first window (at most
        # 8 at 4 a second) are counted once their windows close.
        wait_until(
            "windows after the far-future report",
            lambda: sum(w.count for w in after_it()) >= 20,
            60,
            [flow],
        )
        assert all(w.part == 0 for w in after_it())
    finally:
        flow.stop()
    kinds = _dead_kinds(s, expect=1)
    assert kinds["future"] == ["fut-1"]
    assert "late" not in kinds


def test_a_robot_clock_that_jumps_back_gets_statistics_again(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # A clock that ran 200 s ahead (inside FLEETPULSE_MAX_FUTURE_S) is set right: its
    # reports are late for a while, then the watermark follows the robot's new clock.
    s = isolated(settings, tmp_path, window_s=2, allowed_lateness_s=0.5, offline_after_s=600.0)
    reader = _reader(s)
    flow = FlowProcess(s, tmp_path / "flow.log")
    try:
        for seq in range(10):
            produce(s, encoded([_now_report("jmp-1", seq, ahead_s=200.0)]))
            time.sleep(0.25)
        jumped = time.time()
        for seq in range(10, 50):
            produce(s, encoded([_now_report("jmp-1", seq)]))
            time.sleep(0.25)

        def corrected() -> list[WindowStats]:
            windows = reader.stats("jmp-1", limit=200)
            return [w for w in windows if jumped - 5 < w.window_start.timestamp() < jumped + 60]

        # 40 reports after the jump, about 11 late while it is recognised.
        wait_until(
            "windows on the corrected clock",
            lambda: sum(w.count for w in corrected()) >= 25,
            30,
            [flow],
        )
        windows = corrected()
        ahead = [
            w for w in reader.stats("jmp-1", limit=200) if w.window_start.timestamp() > jumped + 150
        ]
    finally:
        flow.stop()
    # Windows of the minutes the ahead clock already covered are a new part beside them.
    assert {w.part for w in windows} == {1}
    assert sum(w.count for w in windows) >= 20
    assert sum(w.count for w in ahead) == 10
    late = _dead_kinds(s, expect=1).get("late", [])
    # Late only while the jump was being recognised: window_s + lateness of arrivals.
    assert 1 <= len(late) <= 16
