"""Incident notifications: the notifier reads the incidents topic and posts signed
webhooks, once per incident version, and a receiver that is down delays nobody else.

The dataflow, the ingest server and the notifier run as processes; the receivers are
HTTP servers in this test.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deploy.local.harness import metric_total, report, stop_group, wait_until
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.alert_rules import Incident
from fleetpulse.settings import Settings, to_env
from tests.integration.test_alert_rules import Rig, at, rig_settings

SECRET = "s3cret-oncall"


class Receiver:
    """A webhook receiver that records every POST (headers, body, when)."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes, float]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(
                    ({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Notifier:
    def __init__(self, s: Settings, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dataflows.notify"],
                env={**os.environ, **to_env(s)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGTERM)


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    a, b = Receiver(), Receiver()
    yield a, b
    a.close()
    b.close()


def valid(headers: dict[str, str], body: bytes) -> bool:
    t, _, mac = headers["x-fleetpulse-signature"].partition(",v1=")
    ts = t.removeprefix("t=")
    want = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, mac) and abs(time.time() - int(ts)) < 300


def test_each_version_is_posted_once_signed_and_a_down_receiver_delays_nobody(
    stack: Stack, settings: Settings, tmp_path: Path, receivers: tuple[Receiver, Receiver]
) -> None:
    oncall, chat = receivers
    down = f"http://127.0.0.1:{free_port()}/nobody-listens"
    rules = {
        "rules": [
            {"name": "low", "when": {"battery": {"below": 20}}, "severity": "critical",
             "clear": {"battery": {"above": 30}}},
            {"name": "stopped", "when": {"status": {"in": ["estop"]}}, "severity": "warning"},
        ],
        "targets": [
            {"name": "oncall", "url": oncall.url, "severities": ["critical"]},
            {"name": "chat", "url": chat.url, "format": "slack"},
            {"name": "down", "url": down},
        ],
    }  # fmt: skip
    metrics = free_port()
    s = rig_settings(settings, tmp_path, json.dumps(rules))
    s = msgspec.structs.replace(
        s,
        notify_secrets=f"oncall={SECRET}",
        notify_attempts=4,
        notify_backoff_s=1.0,  # the down target: 1 + 2 + 4 s of waiting, then dead
        notify_metrics_port=metrics,
    )
    rig = Rig(s, tmp_path)
    notifier = Notifier(s, tmp_path / "notify.log")
    robots = [f"amr-{i}" for i in range(5)]
    try:
        posted = time.time()
        for robot in robots:  # low, then recovered: opened and closed
            rig.post(report(robot, 1, ts=at(1), battery=10.0))
        rig.post(report("amr-0", 2, ts=at(2), battery=12.0, status="estop"))
        for robot in robots:
            rig.post(report(robot, 3, ts=at(3), battery=50.0))
        # 5 x low opened + closed to oncall (critical only); those and the estop's two
        # versions to chat.
        wait_until("10 notifications to oncall", lambda: len(oncall.posts) >= 10, 60, [rig.flow])
        wait_until("12 notifications to chat", lambda: len(chat.posts) >= 12, 30, [rig.flow])
        # Delivered while the down target was still being retried (7 s per version).
        first_done = max(t for _, _, t in oncall.posts)
        assert first_done - posted < 6.5, first_done - posted
        time.sleep(1)
        assert len(oncall.posts) == 10 and len(chat.posts) == 12

        seen = []
        for headers, body, _ in oncall.posts:
            assert valid(headers, body), headers
            data = json.loads(body)
            incident = msgspec.convert(data["incident"], Incident)
            assert headers["x-fleetpulse-delivery"] == data["delivery"]
            assert headers["x-fleetpulse-event"] == data["event"]
            seen.append((incident.robot_id, data["event"], incident.rule))
        assert sorted(seen) == sorted(
            (r, e, "low") for r in robots for e in ("incident.opened", "incident.closed")
        )
        # Per robot in order: opened before closed.
        for robot in robots:
            events = [e for r, e, _ in seen if r == robot]
            assert events == ["incident.opened", "incident.closed"]
        # Redis holds the same versions as the last ones posted.
        closed = {i.id: i for i in rig.reader.incidents(rule="low", limit=100)}
        for _, body, _ in oncall.posts:
            incident = msgspec.convert(json.loads(body)["incident"], Incident)
            if incident.state == "closed":
                assert closed[incident.id] == incident
        # The Slack-style body is text; unsigned (no secret for chat).
        texts = [json.loads(body)["text"] for _, body, _ in chat.posts]
        assert any(t.startswith("[warning] stopped opened for robot amr-0") for t in texts)
        assert sum("[critical] low closed for robot" in t for t in texts) == 5
        assert all("x-fleetpulse-signature" not in h for h, _, _ in chat.posts)

        # The down target: each of its 12 versions tried 4 times, then counted dead.
        wait_until(
            "the down target's notifications counted dead",
            lambda: metric_total([metrics], 'fleetpulse_notify_dead_total{target="down"}') == 12,
            60,
        )
        assert metric_total([metrics], 'fleetpulse_notify_sent_total{target="oncall"}') == 10
        assert metric_total([metrics], 'fleetpulse_notify_retries_total{target="down"}') == 36
        # A restart sends nothing again: every offset was committed.
        notifier.stop()
        notifier = Notifier(s, tmp_path / "notify.log")
        time.sleep(5)
        assert (len(oncall.posts), len(chat.posts)) == (10, 12)
        assert "given up: ConnectError" in (tmp_path / "notify.log").read_text()
    finally:
        notifier.stop()
        rig.close()
