"""Alert rules end to end: a rules file, incidents in Redis, Kafka and the change stream,
an operator's acknowledgement, rules replaced under load, a geofence on the simulator.

Reports go through the ingest server over HTTP, the dataflow runs as users run it with
FLEETPULSE_RULES_FILE, the outcome is read from Redis, the incidents topic and the
query routes.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.auth import hash_token, new_token, token_fingerprint
from deploy.local.harness import isolated, report
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.alert_rules import Incident
from fleetpulse.settings import Settings
from state.keys import Keys
from state.reader import IncidentChanged, decode_change
from tests.integration.kafka_util import consume_all
from tests.integration.rig import FlowRig

INGEST, ADMIN, READ = new_token(), new_token(), new_token()
TOKENS = f"ingest:{hash_token(INGEST)},admin:{hash_token(ADMIN)},read:{hash_token(READ)}"

RULES = """
rules:
  - name: battery-low
    when: {battery: {below: 20}}
    for_s: 3
    severity: critical
    clear: {battery: {above: 30}}
"""


class Rig(FlowRig):
    """The rig with this file's tokens (the rules file is in its settings)."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        super().__init__(s, tmp, INGEST, ADMIN)


def rig_settings(settings: Settings, tmp: Path, rules: str) -> Settings:
    path = tmp / "rules.yaml"
    path.write_text(rules)
    return isolated(
        settings,
        tmp,
        partitions=4,
        allowed_lateness_s=0.5,  # incidents follow reports within about a second
        offline_after_s=600.0,
        ingest_port=free_port(),
        api_tokens=TOKENS,
        rules_file=str(path),
    )


@pytest.fixture
def rig(stack: Stack, settings: Settings, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(rig_settings(settings, tmp_path, RULES), tmp_path)
    try:
        yield r
    finally:
        r.close()


def at(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).isoformat()


START = datetime.now(UTC).replace(microsecond=0)


def incident_messages(s: Settings, expect: int) -> list[tuple[str, int, Incident]]:
    msgs = consume_all(s, s.topic_incidents, expect=expect, timeout_s=30)
    out = []
    for m in msgs:
        headers = dict(m.headers())
        incident = msgspec.json.decode(m.value(), type=Incident)
        assert headers["incident_id"].decode() == incident.id and m.key() == b"amr-1"
        out.append((incident.id, int(headers["rank"]), incident))
    return out


def test_a_rule_opens_an_incident_an_operator_acknowledges_and_the_clear_closes(
    rig: Rig,
) -> None:
    # Event time: low from 0 s; held 3 s at the report of 3 s; 25 % (hysteresis) keeps it
    # open; 35 % clears it.
    levels = [(0, 15.0), (1, 14.0), (2, 13.0), (3, 12.0), (4, 25.0), (5, 35.0)]
    for seq, (t, level) in enumerate(levels[:4]):
        rig.post(report("amr-1", seq, ts=at(t), battery=level))
    opened = rig.wait(
        "the incident to open",
        lambda: (found := rig.reader.incidents(robot_id="amr-1")) and found[0],
    )
    assert (opened.id, opened.rule, opened.severity, opened.state) == (
        "amr-1:battery-low:0:3",
        "battery-low",
        "critical",
        "open",
    )
    assert (opened.since, opened.opened_at, opened.opened_by) == (
        datetime.fromisoformat(at(0)),
        datetime.fromisoformat(at(3)),
        (0, 3),
    )
    assert rig.reader.incidents(state="open") == [opened]

    # An operator acknowledges it (an ingest token may not).
    path = f"/v1/incidents/{opened.id}/ack"
    refused = rig.api.post(path, headers={"Authorization": f"Bearer {INGEST}"})
    assert refused.status_code == 403
    assert rig.admin("POST", path).status_code == 202
    acked = rig.wait(
        "the acknowledgement",
        lambda: (i := rig.reader.incidents(robot_id="amr-1")[0]).acknowledged_at and i,
    )
    assert acked.acknowledged_by == token_fingerprint(ADMIN) and acked.state == "open"
    assert rig.admin("POST", "/v1/incidents/not-an-id/ack").status_code == 422

    for seq, (t, level) in enumerate(levels[4:], start=4):
        rig.post(report("amr-1", seq, ts=at(t), battery=level))
    closed = rig.wait(
        "the incident to close",
        lambda: (i := rig.reader.incidents(robot_id="amr-1")[0]).state == "closed" and i,
    )
    assert (closed.closed_by, closed.reason, closed.acknowledged_by) == (
        (0, 5),
        "cleared",
        token_fingerprint(ADMIN),
    )
    assert rig.reader.incidents(state="open") == []
    assert rig.reader.incidents(state="closed", severity="critical") == [closed]
    assert rig.reader.incidents(rule="other") == []

    # Kafka: each version once, in rank order; the change stream: the same three.
    versions = incident_messages(rig.s, expect=3)
    assert [(i, rank) for i, rank, _ in versions] == [
        (opened.id, 0),
        (opened.id, 1),
        (opened.id, 3),
    ]
    assert versions[-1][2] == closed
    changes = [decode_change(p) for _, p in rig.reader.changes(None, 1000)]
    on_stream = [c.incident for c in changes if isinstance(c, IncidentChanged)]
    assert on_stream == [opened, acked, closed]

    # The query route serves them too, filtered, with a read token.
    with TestClient(create_app(rig.s, ingest=False)) as c:
        c.headers["Authorization"] = f"Bearer {READ}"
        r = c.get("/v1/incidents", params={"robot_id": "amr-1", "state": "closed"})
        assert r.status_code == 200, r.text
        assert msgspec.json.decode(r.content)["items"][0]["id"] == opened.id
        r = c.get("/v1/incidents", params={"severity": "loud"})
        assert r.status_code == 422 and "severity" in r.text
    assert "incident amr-1:battery-low:0:3 acknowledged (by" in rig.flow.output()


def test_rules_replaced_under_load_apply_without_a_restart_or_a_duplicate(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    rig = Rig(rig_settings(settings, tmp_path, "rules: []\n"), tmp_path)
    robots = [f"amr-{i}" for i in range(20)]
    try:
        got = rig.admin("GET", "/v1/rules")
        assert got.status_code == 200 and got.json()["rules"] == []
        # Refused: bad rules (named), another media type; the file stays as it was.
        bad = rig.admin(
            "PUT",
            "/v1/rules",
            content=b"rules: [{name: x, when: {battery: {below: low}}}]",
            headers={"Content-Type": "application/yaml"},
        )
        assert bad.status_code == 422
        assert "rule 'x' (rules[0]): when.battery.below" in bad.json()["detail"]
        assert rig.admin("PUT", "/v1/rules", content=b"rules: []").status_code == 415
        assert rig.admin("GET", "/v1/rules").json()["rules"] == []

        stop = time.monotonic() + 25
        seq = 0
        replaced_at = None
        while time.monotonic() < stop:
            t = (datetime.now(UTC) - START).total_seconds()
            for robot in robots:
                rig.post(report(robot, seq, ts=at(t), battery=10.0, site="north"))
            seq += 1
            if replaced_at is None and seq == 5:
                put = rig.admin(
                    "PUT",
                    "/v1/rules",
                    json={"rules": [{"name": "low", "when": {"battery": {"below": 20}}}]},
                )
                assert put.status_code == 200, put.text
                assert [r["name"] for r in put.json()["rules"]] == ["low"]
                replaced_at = seq
            time.sleep(0.5)
        opened = rig.wait(
            "an incident per robot",
            lambda: len(found := rig.reader.incidents(state="open", limit=100)) == 20 and found,
            30,
        )
        assert sorted(i.robot_id for i in opened) == sorted(robots)
        # Each robot's incident opened once, by a report after the rules were replaced.
        assert all(i.opened_by[1] >= (replaced_at or 0) - 1 for i in opened)
        versions = incident_messages_any(rig.s, expect=20)
        assert collections.Counter(i for i, _ in versions) == {i.id: 1 for i in opened}
        assert "rules " in rig.flow.output() and "applied from" in rig.flow.output()
        assert rig.flow.alive()  # no restart
    finally:
        rig.close()


def incident_messages_any(s: Settings, expect: int) -> list[tuple[str, int]]:
    msgs = consume_all(s, s.topic_incidents, expect=expect, timeout_s=30)
    return [
        (dict(m.headers())["incident_id"].decode(), int(dict(m.headers())["rank"])) for m in msgs
    ]


def test_a_geofence_on_the_simulators_map_opens_and_closes_incidents(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    fence = [[0, 0], [30, 0], [30, 40], [0, 40]]  # the west half of the 60 x 40 m site
    rules = msgspec.json.encode(
        {"rules": [{"name": "west", "when": {"pose": {"inside": fence}}, "severity": "info"}]}
    ).decode()
    rig = Rig(rig_settings(settings, tmp_path, rules), tmp_path)
    try:
        sim = subprocess.run(
            [sys.executable, "-m", "sim", "--robots", "12", "--rate", "2", "--seed", "5",
             "--fault-prob", "0", "--estop-prob", "0", "--reboot-prob", "0",
             "--url", f"http://127.0.0.1:{rig.s.ingest_port}", "--token", INGEST,
             "--duration", "40"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sim.returncode == 0, sim.stderr[-2000:]

        def crossed() -> list[Incident]:
            found = rig.reader.incidents(limit=1000)
            return [i for i in found if i.state == "closed"] and found

        found = rig.wait("incidents that opened and closed", crossed, 30)
        for incident in found[:10]:
            # The report that opened it is inside the fence; one that closed it outside.
            history = {(h.boot, h.seq): h for h in rig.reader.history(incident.robot_id, 1000)}
            opener = history[incident.opened_by]
            assert 0 <= opener.pose.x < 30, (incident, opener.pose)
            if incident.closed_by is not None:
                closer = history[incident.closed_by]
                assert closer.pose.x > 30, (incident, closer.pose)
        by_robot = collections.Counter(i.robot_id for i in found)
        assert len(by_robot) >= 3  # several robots crossed
        keys = Keys(rig.s.redis_prefix)
        assert rig.redis.zcard(keys.open_incidents) == sum(i.state == "open" for i in found)
    finally:
        rig.close()
