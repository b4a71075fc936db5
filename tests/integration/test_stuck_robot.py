"""A robot stuck behind a higher (boot, seq): seen, alerted once, and freed by an operator.

End to end on the real stack: reports and the admin's reset go through the ingest
server over HTTP, the dataflow runs as users run it, the outcome is read from Redis.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from api.auth import hash_token, new_token
from bench.common import serve_api
from deploy.local.harness import FlowProcess, isolated, report, wait_until
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, to_env
from state.connect import connect
from state.reader import RedisStateReader

INGEST, ADMIN = new_token(), new_token()


def _now(robot: str, seq: int, boot: int) -> dict[str, Any]:
    return report(robot, seq, boot=boot, ts=datetime.now(UTC).isoformat())


def test_a_robot_whose_boot_counter_went_back_is_seen_alerted_and_reset(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    # Regression: a robot reflashed to boot 0 stayed stale forever behind its old
    # (boot 5, seq 12); only a metric counted it, nothing told an operator or let one fix it.
    s = isolated(
        settings,
        tmp_path,
        stuck_after=5,
        offline_after_s=600.0,
        ingest_port=free_port(),
        api_tokens=f"ingest:{hash_token(INGEST)},admin:{hash_token(ADMIN)}",
    )
    reader = RedisStateReader(connect(s), s)
    server = serve_api("ingest", to_env(s), s.ingest_port)
    flow = FlowProcess(s, tmp_path / "flow.log")
    api = httpx.Client(base_url=f"http://127.0.0.1:{s.ingest_port}", timeout=10)
    try:

        def post(body: dict[str, Any]) -> None:
            r = api.post("/v1/reports", json=body, headers={"Authorization": f"Bearer {INGEST}"})
            assert r.status_code == 202, r.text

        for seq in (10, 11, 12):
            post(_now("stk-1", seq, boot=5))
        wait_until(
            "boot 5 seq 12", lambda: (st := reader.get("stk-1")) and st.report.seq == 12, 60, [flow]
        )
        for seq in range(8):  # reflashed: boot 0 again
            post(_now("stk-1", seq, boot=0))
        stuck = wait_until(
            "the stale count in the live state",
            lambda: (st := reader.get("stk-1")) is not None and st.stale == 8 and st,
            30,
            [flow],
        )
        assert (stuck.report.boot, stuck.report.seq, stuck.online) == (5, 12, True)
        alerts = reader.alerts(robot_id="stk-1", limit=10)
        assert [a.kind for a in alerts] == ["stuck"]  # once, not per stale report
        assert "reset-order" in alerts[0].detail

        r = api.post("/v1/robots/stk-1/reset-order", headers={"Authorization": f"Bearer {INGEST}"})
        assert r.status_code == 403  # an ingest token cannot reset anything
        r = api.post("/v1/robots/stk-1/reset-order", headers={"Authorization": f"Bearer {ADMIN}"})
        assert (r.status_code, r.json()) == (202, {"accepted": 1})
        wait_until(
            "the reset applied",
            lambda: (st := reader.get("stk-1")) is not None and st.reset_pending,
            30,
            [flow],
        )
        for seq in (8, 9):
            post(_now("stk-1", seq, boot=0))
        freed = wait_until(
            "boot 0 seq 9 applied",
            lambda: (st := reader.get("stk-1")) is not None and st.report.seq == 9 and st,
            30,
            [flow],
        )
        assert (freed.report.boot, freed.resets, freed.stale, freed.reset_pending) == (
            0,
            1,
            0,
            False,
        )
        history = [(h.boot, h.seq) for h in reader.history("stk-1", limit=10)]
        assert history == [(0, 9), (0, 8), (5, 12), (5, 11), (5, 10)]
        kinds = sorted(a.kind for a in reader.alerts(robot_id="stk-1", limit=10))
        assert kinds == ["order_reset", "stuck"]
        time.sleep(1)
        assert "ordering of robot stk-1 reset" in flow.output()  # audited by the flow too
    finally:
        api.close()
        flow.stop()
        server.terminate()
        server.communicate(timeout=10)
