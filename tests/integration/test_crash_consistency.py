"""Crash consistency, proven: many kill -9 at random moments give the uninterrupted result.

The flow reads a live workload while it is killed again and again: by itself at the
worst moments (``FLEETPULSE_CHAOS``: while snapshotting, between the Redis write and
the Kafka send) and from outside at random times. Afterwards everything in Redis —
live state, history, windows, alerts, summary counters — equals a run that was never
interrupted, over the same Kafka log.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from deploy.local.harness import FlowProcess, encoded, isolated, produce, report, wait_until
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from state.connect import connect
from state.reader import RedisStateReader

ROBOTS = 150
ROUNDS = 80
QUIET = range(8)  # robots silent for a while in the middle: offline, then back online
SILENT_ROUNDS = range(25, 65)


def _workload(rng: random.Random) -> list[list[dict[str, Any]]]:
    """Rounds of reports, one per robot each, some shuffled, repeated or stale."""
    rounds = []
    for k in range(ROUNDS):
        batch = []
        for r in range(ROBOTS):
            if r in QUIET and k in SILENT_ROUNDS:
                continue
            battery = 50.0 - (k % 40) if r % 3 else 90.0  # dips below 20: low_battery alerts
            status = "error" if (r + k) % 37 == 0 else ("estop" if (r + k) % 53 == 0 else "moving")
            errors = ["E_MOTOR"] if status == "error" else []
            one = report(f"amr-{r:03d}", k, battery=battery, status=status, errors=errors)
            batch.append(one)
            roll = rng.random()
            if roll < 0.05:
                batch.append(one)  # redelivered
            elif roll < 0.10 and k > 2:
                batch.append(report(f"amr-{r:03d}", k - 2, battery=battery))  # stale
        rng.shuffle(batch)
        rounds.append(batch)
    return rounds


def _snapshot(reader: RedisStateReader) -> dict[str, Any]:
    """Everything the store holds for the fleet, comparable across runs."""
    out: dict[str, Any] = {"summary": msgspec.to_builtins(reader.summary())}
    alerts = reader.alerts(limit=1000)
    for r in range(ROBOTS):
        robot = f"amr-{r:03d}"
        st = reader.get(robot)
        out[robot] = {
            "state": msgspec.to_builtins(st),
            "history": msgspec.to_builtins(reader.history(robot, limit=1000)),
            "windows": msgspec.to_builtins(reader.stats(robot, limit=1000)),
            "alerts": sorted(
                msgspec.json.encode(a) for a in reader.alerts(robot_id=robot, limit=1000)
            ),
        }
    out["alerts"] = sorted(msgspec.json.encode(a) for a in alerts)
    return out


def _settled(reader: RedisStateReader, windows: int) -> bool:
    """Every robot at its last report, offline after the end, its windows all closed."""
    summary = reader.summary()
    if summary.total != ROBOTS or summary.offline != ROBOTS:
        return False
    for r in range(ROBOTS):
        robot = f"amr-{r:03d}"
        st = reader.get(robot)
        if (
            st is None
            or st.report.seq != ROUNDS - 1
            or len(reader.stats(robot, limit=1000)) < windows
        ):
            return False
    return True


def test_kill9_ten_times_at_random_moments_equals_the_uninterrupted_run(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    base = isolated(
        settings,
        tmp_path,
        window_s=5,
        allowed_lateness_s=2.0,
        offline_after_s=3.0,
        snapshot_interval_s=1,
        history_len=1000,
    )
    rounds = _workload(random.Random(11))

    def feed() -> None:
        for batch in rounds:
            produce(base, encoded(batch))
            time.sleep(0.15)

    # The interrupted run reads the workload while it is being produced.
    crashed = msgspec.structs.replace(base, redis_prefix=base.redis_prefix + "x")
    reader = RedisStateReader(connect(crashed), crashed)
    feeder = threading.Thread(target=feed, daemon=True)
    rng = random.Random()
    deaths: list[str] = []
    plan = ["snapshot:0.01", "sink:0.05"]  # first die inside a snapshot, then mid-sink
    run = 0
    feeder.start()
    while len(deaths) < 10 or "snapshot" not in deaths or "sink" not in deaths:
        run += 1
        assert run < 40, f"too many runs: {deaths}"
        chaos = plan.pop(0) if plan else rng.choice(["", "snapshot:0.002,sink:0.01"])
        s = msgspec.structs.replace(crashed, chaos=chaos)
        flow = FlowProcess(s, tmp_path / f"run-{run}.log")
        deadline = time.monotonic() + (
            15.0 if chaos in ("snapshot:0.01", "sink:0.05") else rng.uniform(2.0, 6.0)
        )
        while flow.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if flow.alive():
            flow.kill9()
            deaths.append("outside")
        else:
            flow.wait()
            text = flow.output()
            assert flow.proc.returncode == -9, text
            deaths.append("snapshot" if "SIGKILL at snapshot" in text else "sink")
    feeder.join()
    final = FlowProcess(crashed, tmp_path / "final.log")
    try:
        wait_until(
            "the interrupted run settled", lambda: _settled(reader, base.window_s), 120, [final]
        )
        time.sleep(2)  # anything still on its way would show now
        got = _snapshot(reader)
    finally:
        final.stop()

    ref = msgspec.structs.replace(
        base, redis_prefix=base.redis_prefix + "r", recovery_dir=str(tmp_path / "ref")
    )
    ref_reader = RedisStateReader(connect(ref), ref)
    flow = FlowProcess(ref, tmp_path / "ref.log")
    try:
        wait_until(
            "the reference run settled", lambda: _settled(ref_reader, base.window_s), 120, [flow]
        )
        time.sleep(2)
        want = _snapshot(ref_reader)
    finally:
        flow.stop()

    assert len(deaths) >= 10 and {"snapshot", "sink", "outside"} <= set(deaths), deaths
    assert got["summary"] == want["summary"]
    assert got["alerts"] == want["alerts"]
    assert len(set(got["alerts"])) == len(got["alerts"])  # no alert twice
    kinds = {msgspec.json.decode(a)["kind"] for a in want["alerts"]}
    assert {"low_battery", "error", "estop", "offline", "back_online"} <= kinds
    for r in range(ROBOTS):
        robot = f"amr-{r:03d}"
        assert got[robot] == want[robot], robot
