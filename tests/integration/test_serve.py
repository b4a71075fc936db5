"""The ingest server as users run it: `python -m api.serve ingest` under granian."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from api.auth import hash_token, new_token
from deploy.local.procs import free_port, wait_http_ready
from fleetpulse.errors import StackError
from fleetpulse.schema import decode_report
from fleetpulse.settings import Settings
from tests.integration.kafka_util import consume_all
from tests.integration.test_ingest import report


def test_granian_ingest_server_accepts_reports_into_kafka(
    settings: Settings, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(3)
    token = new_token()
    port = free_port()
    env = {
        **os.environ,
        "FLEETPULSE_INGEST_PORT": str(port),
        "FLEETPULSE_TOPIC_REPORTS": topic,
        "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(token)}",
        "FLEETPULSE_API_WORKERS": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.serve", "ingest"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http_ready(f"{base}/readyz", proc)
        except StackError as exc:
            pytest.fail(f"ingest server did not become ready: {exc}")
        auth = {"Authorization": f"Bearer {token}"}
        for seq in range(10):
            r = httpx.post(f"{base}/v1/reports", json=report("amr-srv", seq=seq), headers=auth)
            assert (r.status_code, r.json()) == (202, {"accepted": 1})
        r = httpx.post(f"{base}/v1/reports", json=report("amr-srv", seq=1), timeout=5)
        assert r.status_code == 401
        # The query routes are not served by the ingest server.
        assert httpx.get(f"{base}/v1/robots", headers=auth).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        finally:
            if proc.stdout:
                proc.stdout.close()
    assert proc.returncode == 0
    msgs = consume_all(settings, topic, expect=10)
    assert sorted(decode_report(m.value()).seq for m in msgs) == list(range(10))


def test_bad_settings_stop_start_up_with_a_clear_message() -> None:
    env = {**os.environ, "FLEETPULSE_API_TOKENS": "admin:1234"}
    done = subprocess.run(
        [sys.executable, "-m", "api.serve", "ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "FLEETPULSE_API_TOKENS entry 'admin:...' is not allowed" in done.stderr
    assert "1234" not in done.stderr  # a secret-looking value is not echoed

    env = {**os.environ, "FLEETPULSE_INGEST_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "api.serve", "ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "FLEETPULSE_INGEST_PORT='0' is not allowed" in done.stderr
