"""`python -m sim` against the real ingest server (granian) and the local stack's Kafka."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from api.auth import hash_token, new_token
from deploy.local.procs import free_port, wait_http_ready
from fleetpulse.errors import StackError
from fleetpulse.schema import RobotReport, decode_report
from fleetpulse.settings import Settings
from sim.cli import SIM_TOKEN_ENV
from tests.integration.kafka_util import consume_all


@dataclass(frozen=True)
class Server:
    url: str
    token: str
    topic: str


def _clean_env() -> dict[str, str]:
    # A token exported in the developer's shell must not leak into these runs.
    return {k: v for k, v in os.environ.items() if k != SIM_TOKEN_ENV}


@contextmanager
def ingest_server(topic: str) -> Iterator[Server]:
    """`python -m api.serve ingest` on a free port, writing to ``topic``."""
    token, port = new_token(), free_port()
    env = {
        **_clean_env(),
        "FLEETPULSE_INGEST_PORT": str(port),
        "FLEETPULSE_TOPIC_REPORTS": topic,
        "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(token)}",
        "FLEETPULSE_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.serve", "ingest"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ready(f"{url}/readyz", proc)
        except StackError as exc:
            pytest.fail(f"ingest server did not become ready: {exc}")
        yield Server(url, token, topic)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        finally:
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def server(make_topic: Callable[..., str]) -> Iterator[Server]:
    with ingest_server(make_topic(3)) as s:
        yield s


def sim(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, dict[str, Any], str]:
    """Run the simulator; its exit status, the JSON summary (stdout's last line), stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "sim", *args],
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no summary on stdout; stderr:\n{done.stderr}"
    return done.returncode, json.loads(lines[-1]), done.stderr


def on_topic(settings: Settings, topic: str, expect: int) -> list[RobotReport]:
    msgs = consume_all(settings, topic, expect=expect)
    reports = [decode_report(m.value()) for m in msgs]
    assert all(m.key() == r.robot_id.encode() for m, r in zip(msgs, reports, strict=True))
    return reports


def last_orders(reports: list[RobotReport]) -> dict[str, list[int]]:
    out: dict[str, tuple[int, int]] = {}
    for r in reports:
        out[r.robot_id] = max(out.get(r.robot_id, r.order), r.order)
    return {k: list(v) for k, v in out.items()}


def test_single_posts_land_in_kafka_and_the_silence_shows(
    server: Server, settings: Settings
) -> None:
    rc, summary, err = sim(
        "--robots", "5", "--rate", "5", "--duration", "3", "--seed", "1",
        "--url", server.url, "--token", server.token, "--site", "plant-1",
        "--silence", "amr-002:1:1.2", "--progress-s", "1", "--detail",
    )  # fmt: skip
    assert rc == 0, err
    assert summary["ok"] is True and summary["problem"] is None
    assert summary["stopped_by"] == "duration" and summary["seed"] == 1
    assert 2.9 <= summary["duration_s"] < 6
    # ~5 robots x 5/s x 3 s, minus the silence; every one answered 202.
    assert 60 <= summary["accepted"] <= 75
    assert summary["sent"] == summary["accepted"]
    assert (summary["rejected"], summary["unsent"], summary["batch"]) == ({}, 0, None)
    assert summary["requests"] == summary["sent"] + summary["retried"]
    assert "sim " in err and "accepted" in err  # progress lines (stderr is not a TTY)

    reports = on_topic(settings, server.topic, summary["accepted"])
    assert len(reports) == summary["accepted"]
    ids = [f"amr-{i:03d}" for i in range(5)]
    assert sorted({r.robot_id for r in reports}) == ids
    assert {r.site for r in reports} == {"plant-1"}
    per_robot = Counter(r.robot_id for r in reports)
    assert {rid: v["accepted"] for rid, v in summary["per_robot"].items()} == dict(per_robot)
    assert {rid: [v["boot"], v["seq"]] for rid, v in summary["per_robot"].items()} == last_orders(
        reports
    )

    (silence,) = summary["silences"]
    assert (silence["robot_id"], silence["start_s"], silence["end_s"]) == ("amr-002", 1.0, 2.2)
    start = datetime.fromisoformat(silence["start_ts"])
    end = datetime.fromisoformat(silence["end_ts"])
    assert (end - start).total_seconds() == pytest.approx(1.2)
    mine = [r.ts for r in reports if r.robot_id == "amr-002"]
    assert not [ts for ts in mine if start <= ts < end]
    # The window is real: the robot spoke just before it and again after it.
    assert any(start.timestamp() - 0.5 <= ts.timestamp() < start.timestamp() for ts in mine)
    assert any(end.timestamp() <= ts.timestamp() < end.timestamp() + 0.5 for ts in mine)
    others = [r for r in reports if r.robot_id == "amr-001" and start <= r.ts < end]
    assert len(others) >= 5


def test_batches_with_duplicates_shuffles_and_a_reboot(server: Server, settings: Settings) -> None:
    env = {**_clean_env(), SIM_TOKEN_ENV: server.token}  # the token from the environment
    rc, summary, err = sim(
        "--robots", "5", "--rate", "5", "--duration", "4", "--seed", "2", "--url", server.url,
        "--batch", "20", "--duplicate-prob", "0.1", "--shuffle-prob", "0.1",
        "--reboot", "amr-001:0.5",  # off for 1-3 s: back before the end
        "--detail", env=env,
    )  # fmt: skip
    assert rc == 0, err
    assert summary["batch"] == 20
    assert summary["rejected"] == {} and summary["sent"] == summary["accepted"]
    # Batches gather reports across robots: far fewer requests than reports.
    assert summary["requests"] <= summary["accepted"] / 3
    assert summary["duplicated"] > 0 and summary["shuffled"] > 0

    reports = on_topic(settings, server.topic, summary["accepted"])
    assert len(reports) == summary["accepted"]
    assert sorted({r.robot_id for r in reports}) == [f"amr-{i:03d}" for i in range(5)]
    copies = Counter((r.robot_id, r.order) for r in reports)
    assert sum(n - 1 for n in copies.values()) == summary["duplicated"]
    # The reboot: boot 1 from seq 0, and the summary says so.
    assert {"robot_id": "amr-001", "boot": 1} in [
        {k: r[k] for k in ("robot_id", "boot")} for r in summary["reboots"]
    ]
    seqs: dict[int, set[int]] = defaultdict(set)
    for r in reports:
        if r.robot_id == "amr-001":
            seqs[r.boot].add(r.seq)
    assert sorted(seqs) == [0, 1]
    for boot_seqs in seqs.values():
        assert boot_seqs == set(range(len(boot_seqs)))  # nothing lost, shuffles included
    assert {rid: [v["boot"], v["seq"]] for rid, v in summary["per_robot"].items()} == last_orders(
        reports
    )


def test_sigint_finishes_in_flight_posts_and_prints_the_summary(
    server: Server, settings: Settings
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", "--robots", "3", "--rate", "10", "--seed", "3",
         "--url", server.url, "--token", server.token],
        env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "signal"
    assert summary["unsent"] == 0 and summary["sent"] == summary["accepted"] > 20
    assert len(on_topic(settings, server.topic, summary["accepted"])) == summary["accepted"]


def test_a_wrong_token_is_counted_as_rejected_and_fails_the_run(server: Server) -> None:
    rc, summary, err = sim("--count", "6", "--rate", "5", "--url", server.url, "--token", "nope")
    assert rc == 1
    assert summary["rejected"] == {"unauthorized": 6} and summary["accepted"] == 0
    assert "every report was rejected (unauthorized x6)" in err
    assert "unknown bearer token" in err


def test_the_summary_stays_one_short_line_for_a_large_fleet(server: Server) -> None:
    # Regression: with 20,000 robots the summary printed about 1 MB of per-robot JSON.
    rc, summary, err = sim(
        "--robots", "20000", "--rate", "0.05", "--duration", "1", "--batch", "500",
        "--url", server.url, "--token", server.token, "--silence-prob", "0.01",
    )  # fmt: skip
    assert rc == 0, err
    assert summary["robots"] == 20000 and summary["accepted"] > 0
    assert len(json.dumps(summary)) < 1000
    assert "per_robot" not in summary and isinstance(summary["silence_count"], int)


def test_nothing_reachable_fails_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    rc, summary, err = sim("--duration", "1", "--rate", "5", "--url", url, "--token", "t")
    assert rc == 1
    assert time.monotonic() - started < 15  # no long wait for a server that never answered
    assert f"nothing could be sent: {url} never answered (connection refused" in err
    assert summary["accepted"] == 0 and summary["ok"] is False
    assert summary["retry_causes"]["connection refused"] > 0
    assert summary["sent"] == summary["unsent"] > 0
