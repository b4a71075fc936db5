"""Bounded cardinality: robots retired by an admin or by silence, and the robot limit.

End to end on the real stack: reports and the admin's command go through the ingest
server over HTTP, the dataflow runs as users run it, the outcome is read from Redis.
What must hold after every retirement: the summary's counters equal what the listing
shows, nothing of the robot is left but its tombstone, and neither a re-publish nor a
restart from the checkpoint brings it back.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import hash_token, new_token, token_fingerprint
from deploy.local.harness import FlowProcess, Reporter, isolated, metric_total, report
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.settings import Settings
from state.connect import connect
from state.keys import Keys
from state.projection import Projection
from state.reader import RedisStateReader, RobotRetired, decode_change
from tests.integration.kafka_util import consume_all
from tests.integration.rig import FlowRig, all_robots

INGEST, ADMIN = new_token(), new_token()
TOKENS = f"ingest:{hash_token(INGEST)},admin:{hash_token(ADMIN)}"


def _now(robot: str, seq: int, **over: Any) -> dict[str, Any]:
    return report(robot, seq, ts=datetime.now(UTC).isoformat(), **over)


def counters_match_the_listing(reader: RedisStateReader) -> dict[str, int]:
    """Assert every summary counter equals the count of what the listing shows; the
    listing by status (the counters a retirement takes back most)."""
    listed = all_robots(reader)
    summary = reader.summary()
    by_status = collections.Counter(st.report.status for st in listed)
    by_site = collections.Counter(st.report.site for st in listed if st.report.site)
    assert summary.total == len(listed)
    assert summary.online == sum(st.online for st in listed)
    assert summary.offline == sum(not st.online for st in listed)
    assert summary.low_battery == sum(st.report.battery <= 20.0 for st in listed)
    assert {k: v for k, v in summary.by_status.items() if v} == dict(by_status)
    assert {k: v for k, v in summary.by_site.items() if v} == dict(by_site)
    by_site_status: dict[str, dict[str, int]] = {}
    for st in listed:
        if st.report.site:
            per = by_site_status.setdefault(st.report.site, {})
            per[st.report.status] = per.get(st.report.status, 0) + 1
    assert summary.by_site_status == by_site_status
    return dict(by_status)


class Fleet(FlowRig):
    """The rig with this file's tokens, and what retirement tests look at."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        super().__init__(s, tmp, INGEST, ADMIN)

    def retire(self, robot: str, token: str = ADMIN) -> httpx.Response:
        return self.api.post(
            f"/v1/robots/{robot}/retire", headers={"Authorization": f"Bearer {token}"}
        )

    def restart_flow(self) -> None:
        self.flow.kill9()
        self.flow = FlowProcess(self.s, self.tmp / "flow.log")

    def left_of(self, robot: str) -> dict[str, Any]:
        """Every key of the robot still in Redis, with its type and (for a hash) fields."""
        keys = Keys(self.s.redis_prefix)
        left: dict[str, Any] = {}
        for key in self.redis.scan_iter(match=f"{keys.prefix}:*{{{robot}}}", count=1000):
            name = key.decode()
            kind = self.redis.type(key).decode()
            left[name] = sorted(self.redis.hkeys(key)) if kind == "hash" else kind
        return left


@pytest.fixture
def fleet(stack: Stack, settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    s = isolated(
        settings,
        tmp_path,
        partitions=4,
        offline_after_s=600.0,
        window_s=1,
        allowed_lateness_s=0.0,
        ingest_port=free_port(),
        api_tokens=TOKENS,
    )
    f = Fleet(s, tmp_path)
    try:
        yield f
    finally:
        f.close()


def test_an_admin_retires_a_robot_everywhere_and_nothing_brings_it_back(fleet: Fleet) -> None:
    # Regression: any ingest token could mint robot ids that stayed in the listing, the
    # indexes and the summary forever; nothing could take one out.
    robots = [f"ret-{i}" for i in range(6)]
    for seq in (1, 2, 3):
        for i, robot in enumerate(robots):
            fleet.post(
                _now(
                    robot,
                    seq,
                    site=f"site-{i % 2}",
                    status=["moving", "idle", "error"][i % 3],
                    battery=10.0 if i in (0, 3) else 80.0,
                )
            )
        time.sleep(1.1)  # 1-second windows: each robot closes some
    fleet.wait("6 robots listed", lambda: fleet.reader.summary().total == 6)
    fleet.wait("ret-0's windows", lambda: fleet.reader.stats("ret-0", limit=5))
    fleet.wait("ret-0's low_battery alert", lambda: fleet.reader.alerts(robot_id="ret-0"))
    before = counters_match_the_listing(fleet.reader)
    assert before == {"moving": 2, "idle": 2, "error": 2}
    assert fleet.reader.summary().low_battery == 2
    changes_before = fleet.redis.xlen(Keys(fleet.s.redis_prefix).changes)

    assert fleet.retire("ret-0", INGEST).status_code == 403  # an ingest token retires nothing
    r = fleet.retire("ret-0")
    assert (r.status_code, r.json()) == (202, {"accepted": 1})
    fleet.wait("ret-0 gone", lambda: fleet.reader.get("ret-0") is None)
    after = counters_match_the_listing(fleet.reader)
    assert after == {"moving": 1, "idle": 2, "error": 2}
    summary = fleet.reader.summary()
    assert (summary.total, summary.low_battery, summary.by_site) == (
        5,
        1,
        {"site-0": 2, "site-1": 3},
    )
    # Its history, windows, alerts are gone; its hash is a tombstone (the arrival ms).
    assert fleet.left_of("ret-0") == {f"{fleet.s.redis_prefix}:robot:{{ret-0}}": [b"gone"]}
    assert fleet.reader.history("ret-0") == [] and fleet.reader.stats("ret-0") == []
    assert fleet.reader.alerts(robot_id="ret-0") == []
    # SSE clients are told.
    entries = fleet.redis.xrange(Keys(fleet.s.redis_prefix).changes, count=changes_before + 50)
    retired = [
        e
        for e in (decode_change(fields[b"data"]) for _, fields in entries)
        if isinstance(e, RobotRetired)
    ]
    assert [e.robot_id for e in retired] == ["ret-0"]
    assert abs(retired[0].at.timestamp() - time.time()) < 30
    assert f"robot ret-0 retired (by {token_fingerprint(ADMIN)}" in fleet.flow.output()

    # A re-publish writes the flow's state: ret-0 is not in it.
    projection = Projection(connect(fleet.s), fleet.s.redis_prefix)
    projection.request()
    fleet.wait(
        "the re-publish", lambda: projection.published_to() == projection.server(), timeout_s=60
    )
    assert fleet.reader.get("ret-0") is None
    counters_match_the_listing(fleet.reader)

    # A restart replays from the checkpoint (a snapshot a second old at most, so the
    # retirement may be replayed too): still gone, the counters still right.
    time.sleep(1.5)
    fleet.restart_flow()
    fleet.post(_now("ret-1", 10, site="site-1", status="idle"))
    fleet.wait(
        "the restarted flow applied ret-1", lambda: fleet.reader.get("ret-1").report.seq == 10
    )
    assert fleet.reader.get("ret-0") is None
    assert counters_match_the_listing(fleet.reader) == {"moving": 1, "idle": 2, "error": 2}

    # A report after the retirement starts a new robot: a history of one report.
    fleet.post(_now("ret-0", 1, site="site-0", status="idle", battery=90.0))
    back = fleet.wait("ret-0 back", lambda: fleet.reader.get("ret-0"))
    assert (back.report.seq, back.resets, back.online) == (1, 0, True)
    assert [h.seq for h in fleet.reader.history("ret-0")] == [1]
    assert counters_match_the_listing(fleet.reader) == {"moving": 1, "idle": 3, "error": 2}
    assert b"gone" not in fleet.left_of("ret-0")[f"{fleet.s.redis_prefix}:robot:{{ret-0}}"]


def test_a_retired_robot_never_seen_is_a_no_op(fleet: Fleet) -> None:
    fleet.post(_now("ret-a", 1))
    fleet.wait("ret-a", lambda: fleet.reader.get("ret-a"))
    assert fleet.retire("never-seen").status_code == 202
    fleet.post(_now("ret-a", 2))
    fleet.wait("ret-a at seq 2", lambda: fleet.reader.get("ret-a").report.seq == 2)
    assert fleet.reader.summary().total == 1
    # Only a tombstone (so older writes of it cannot land), and no `retired` event.
    left = fleet.left_of("never-seen")
    assert left == {f"{fleet.s.redis_prefix}:robot:{{never-seen}}": [b"gone"]}
    ttl = fleet.redis.ttl(f"{fleet.s.redis_prefix}:robot:{{never-seen}}")
    assert 86_000 < ttl <= 86_400


def test_robots_silent_past_the_retention_are_retired(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    metrics = free_port()
    s = isolated(
        settings,
        tmp_path,
        partitions=4,
        offline_after_s=1.0,
        retire_after_s=4.0,
        ingest_port=free_port(),
        api_tokens=TOKENS,
        dataflow_metrics_port=metrics,
    )
    fleet = Fleet(s, tmp_path)
    try:
        for i in range(5):
            fleet.post(_now(f"old-{i}", 1, site="site-9", status="idle"))
        with Reporter(s, ["live-1", "live-2"], every_s=0.3):
            fleet.wait("7 robots", lambda: fleet.reader.summary().total == 7)
            offline = fleet.wait(
                "the silent ones offline",
                lambda: fleet.reader.summary().online == 2 and fleet.reader.summary(),
            )
            assert offline.total == 7
            counters_match_the_listing(fleet.reader)
            fleet.wait("the silent ones retired", lambda: fleet.reader.summary().total == 2)
            listed, _ = fleet.reader.list_robots()
            assert [st.report.robot_id for st in listed] == ["live-1", "live-2"]
            assert all(st.online for st in listed)
            counters_match_the_listing(fleet.reader)
            assert fleet.reader.summary().by_site == {"plant-1": 2}
        total = metric_total([metrics], 'fleetpulse_flow_robots_retired_total{why="retention"}')
        assert total == 5
        assert "robot(s) retired after 4 s without a report" in fleet.flow.output()
    finally:
        fleet.close()


def test_new_robots_beyond_the_limit_are_dead_letters(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(
        settings,
        tmp_path,
        partitions=2,
        shards=4,
        max_robots=8,  # two per shard
        ingest_port=free_port(),
        api_tokens=TOKENS,
    )
    fleet = Fleet(s, tmp_path)
    try:
        robots = [f"cap-{i}" for i in range(40)]
        for robot in robots:
            fleet.post(_now(robot, 1))
        held = fleet.wait("8 robots", lambda: fleet.reader.summary().total == 8 and 8)
        time.sleep(2)
        assert fleet.reader.summary().total == held
        counters_match_the_listing(fleet.reader)
        dead = consume_all(s, s.topic_dlq, expect=32)
        kinds = collections.Counter(dict(m.headers())["kind"] for m in dead)
        assert kinds == {b"limit": 32}
        listed = {st.report.robot_id for st in fleet.reader.list_robots(limit=100)[0]}
        assert listed | {m.key().decode() for m in dead} == set(robots)
        # Robots already held keep reporting.
        first = sorted(listed)[0]
        fleet.post(_now(first, 2))
        fleet.wait("a held robot goes on", lambda: fleet.reader.get(first).report.seq == 2)
    finally:
        fleet.close()
