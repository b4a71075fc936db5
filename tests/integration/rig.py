"""An ingest server and a dataflow, as users run them, for end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from bench.common import serve_api
from deploy.local.harness import FlowProcess, wait_until
from fleetpulse.schema import LiveState
from fleetpulse.settings import Settings, to_env
from state.connect import connect
from state.reader import RedisStateReader


class FlowRig:
    """An ingest server (on ``s.ingest_port``) and a dataflow on the settings' topics and
    prefix; reports are posted with ``ingest_token``, admin commands with
    ``admin_token``."""

    def __init__(self, s: Settings, tmp: Path, ingest_token: str, admin_token: str) -> None:
        self.s, self.tmp = s, tmp
        self.ingest_token, self.admin_token = ingest_token, admin_token
        self.reader = RedisStateReader(connect(s), s)
        self.redis = connect(s)
        self.server = serve_api("ingest", to_env(s), s.ingest_port)
        self.flow = FlowProcess(s, tmp / "flow.log")
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{s.ingest_port}", timeout=10)

    def post(self, body: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {self.ingest_token}"}
        r = self.api.post("/v1/reports", json=body, headers=headers)
        assert r.status_code == 202, r.text

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin_token}", **kw.pop("headers", {})}
        return self.api.request(method, path, headers=headers, **kw)

    def wait(self, what: str, check: Any, timeout_s: float = 60) -> Any:
        return wait_until(what, check, timeout_s, [self.flow])

    def close(self) -> None:
        self.api.close()
        self.flow.stop()
        self.server.terminate()
        self.server.communicate(timeout=10)


def all_robots(reader: RedisStateReader) -> list[LiveState]:
    """Every robot's live state, page by page through the listing."""
    robots: list[LiveState] = []
    cursor = None
    while True:
        page, cursor = reader.list_robots(cursor=cursor, limit=500)
        robots += page
        if cursor is None:
            return robots
