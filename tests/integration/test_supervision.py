"""Supervision in the main job: kill -9 the dataflow, then ingest, then query, under load.

Ten robots of the test's own (``sup-0`` .. ``sup-9``) post a report every ~0.1 s through
the ingest server, retrying the same report on a refused connection or a 503 and noting
every ``(robot, seq)`` answered 202. Meanwhile each child of the main job is killed with
SIGKILL (its main process only, as a crash would: granian's worker stays behind and the
job must clear it). After each kill the job prints one restart line (exit status, the
last error line of the child's log, the back-off) and the child serves again. At the end
every acknowledged report is in its robot's history and live state holds the newest one.
Then the query server is killed again and again until the job gives up, saying why, and
stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.local.harness import BASE_TS, isolated, report, wait_until
from deploy.local.procs import free_port, last_error_line, port_in_use
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, to_env

ROBOTS = [f"sup-{i}" for i in range(10)]
RETRY = {502, 503, 504}


class Poster(threading.Thread):
    """One robot posting increasing seqs; a refused or 503'd report is retried unchanged."""

    def __init__(self, robot_id: str, url: str, token: str, stop: threading.Event) -> None:
        super().__init__(name=f"poster-{robot_id}", daemon=True)
        self.robot_id = robot_id
        self.url = url
        self.token = token
        self.stop = stop
        self.acked: list[int] = []  # seqs answered 202, in order
        self.sent = -1  # the newest seq posted, answered or not
        self.refused: list[str] = []  # answers that are neither 202 nor worth a retry

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=5) as client:
            seq = 0
            while not self.stop.is_set():
                body = report(self.robot_id, seq, t=time.time() - BASE_TS)
                self.sent = seq
                while not self.stop.is_set():
                    try:
                        status = client.post("/v1/reports", json=body).status_code
                    except httpx.TransportError:
                        status = 0
                    if status == 202:
                        self.acked.append(seq)
                        break
                    if status and status not in RETRY:
                        self.refused.append(f"seq {seq}: HTTP {status}")
                        return
                    time.sleep(0.1)
                seq += 1
                self.stop.wait(0.1)


class MainJob:
    """``python -m deploy.local.main`` in its own session, its output in a file."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        self.out_path = tmp / "main.out"
        self.logs = tmp / "logs"
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.local.main", "--robots", "3", "--rate", "1",
                 "--logs", str(self.logs)],
                env={**os.environ, **to_env(s)},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, what: str, check: Callable[[str], Any], timeout_s: float) -> Any:
        """Poll ``check(output)``; an exited job fails at once with its output."""

        def probe() -> Any:
            text = self.output()
            found = check(text)
            if not found and self.proc.poll() is not None:
                raise AssertionError(f"the main job exited while waiting for {what}:\n{text}")
            return found

        try:
            return wait_until(what, probe, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- main job output ---\n{self.output()}") from None

    def pids(self, name: str) -> list[int]:
        """The pids the job started ``name`` with, in order."""
        return [int(p) for p in re.findall(rf"^{name}\s+started, pid (\d+)", self.output(), re.M)]

    def restart_lines(self, name: str) -> list[str]:
        return re.findall(rf"^{name}\s+exited with .*$", self.output(), re.M)


def _kill(job: MainJob, name: str) -> int:
    """SIGKILL the current main process of ``name``, after an error line only this test wrote."""
    pid = job.pids(name)[-1]
    marker = f"supervision test: about to kill {name} pid {pid}"
    with (job.logs / f"{name}.log").open("a") as log:
        log.write(f'{{"level":"ERROR","service":"test","logger":"test","msg":"{marker}"}}\n')
    os.kill(pid, signal.SIGKILL)
    return pid


def _restarted(job: MainJob, name: str, kills: int) -> None:
    """Wait for the ``kills``-th restart line of ``name`` and for its new start line."""
    job.wait_for(
        f"{name} restarted after kill {kills}",
        lambda _: len(job.restart_lines(name)) >= kills and len(job.pids(name)) > kills,
        45,
    )


@pytest.mark.timeout(240)
def test_main_job_restarts_killed_children_and_loses_no_acknowledged_report(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    s = isolated(
        settings,
        tmp_path,
        history_len=5000,
        ingest_port=free_port(),
        query_port=free_port(),
        dashboard_port=free_port(),
        dataflow_metrics_port=free_port(2),  # process 1 on the next port
    )
    started = time.monotonic()
    job = MainJob(s, tmp_path)
    stop = threading.Event()
    posters: list[Poster] = []
    cleanup = contextlib.ExitStack()
    try:
        tokens = job.wait_for(
            "the main job to print where to look",
            lambda text: re.search(r"read: (fp_\S+)\s+ingest: (fp_\S+)", text),
            120,
        )
        read_token, ingest_token = tokens.group(1), tokens.group(2)
        ingest_url = f"http://127.0.0.1:{s.ingest_port}"
        query_url = f"http://127.0.0.1:{s.query_port}"
        api = cleanup.enter_context(
            httpx.Client(
                base_url=query_url, headers={"Authorization": f"Bearer {read_token}"}, timeout=5
            )
        )
        posters = [Poster(r, ingest_url, ingest_token, stop) for r in ROBOTS]
        for p in posters:
            p.start()

        def live_seq(robot_id: str) -> int:
            try:
                r = api.get(f"/v1/robots/{robot_id}")
            except httpx.TransportError:
                return -1
            return int(r.json()["report"]["seq"]) if r.status_code == 200 else -1

        def acks() -> int:
            return sum(len(p.acked) for p in posters)

        def flowing_after(mark: int) -> bool:
            """Reports acknowledged after ``mark`` (a sup-0 seq) reach live state."""
            return live_seq("sup-0") > mark

        wait_until("reports from the test's robots in live state", lambda: flowing_after(5), 60)

        # 1. The dataflow: it resumes from its checkpoint and processes new reports.
        killed = {"dataflow": _kill(job, "dataflow")}
        _restarted(job, "dataflow", 1)
        mark = posters[0].acked[-1]
        wait_until("the restarted dataflow to process new reports", lambda: flowing_after(mark), 60)
        flow_log = (job.logs / "dataflow.log").read_text(errors="replace")
        assert flow_log.count("recovery partitions in") == 1, "made once, on the first run"
        # Each of the cluster's 2 processes says so, on the first run and on the restart.
        assert flow_log.count("recovery on, partitions in") == 4, "the restart resumed from them"

        # 2. Ingest: granian's worker outlives its killed parent; the port must come back.
        killed["ingest"] = _kill(job, "ingest")
        _restarted(job, "ingest", 1)
        before = acks()
        wait_until("202s from the restarted ingest server", lambda: acks() >= before + 20, 45)

        # 3. Query: answers again.
        killed["query"] = _kill(job, "query")
        _restarted(job, "query", 1)

        def query_ready() -> bool:
            try:
                return httpx.get(f"{query_url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until("the restarted query server to be ready", query_ready, 45)
        mark = posters[0].acked[-1]
        wait_until("fresh live state through the new query server", lambda: flowing_after(mark), 45)

        stop.set()
        for p in posters:
            p.join(15)
        assert not [p.refused for p in posters if p.refused]
        assert all(len(p.acked) >= 50 for p in posters), [len(p.acked) for p in posters]
        assert all(len(p.acked) < 1000 for p in posters), "history is read in one page of 1000"

        def missing() -> dict[str, Any]:
            gaps: dict[str, Any] = {}
            for p in posters:
                r = api.get(f"/v1/robots/{p.robot_id}/history", params={"limit": 1000})
                seen = {item["seq"] for item in r.json()["items"]}
                lost = sorted(set(p.acked) - seen)
                live = live_seq(p.robot_id)
                # The newest acknowledged report, or one posted after it whose 202 never came.
                if lost or live not in (p.acked[-1], p.sent):
                    gaps[p.robot_id] = {"lost": lost[:20], "live": live, "acked": p.acked[-1]}
            return gaps

        def all_there() -> bool:
            return not missing()

        try:
            wait_until("every acknowledged report in Redis", all_there, 30)
        except AssertionError:
            raise AssertionError(f"acknowledged reports missing: {missing()}") from None

        # One restart line per kill, naming the child, its status and the last error line.
        for name, pid in killed.items():
            lines = job.restart_lines(name)
            assert len(lines) == 1, lines
            assert re.fullmatch(
                rf"{name}\s+exited with -9 \(signal SIGKILL\); last error line: .*"
                rf"about to kill {name} pid {pid}.*; restart 1 in \d+(\.\d+)?s",
                lines[0],
            ), lines[0]
        loaded = time.monotonic() - started

        # Repeated crashes in a short window: the job gives up, says why, stops its own.
        for kills in range(2, 7):
            if "giving up" in job.output():
                break
            _kill(job, "query")
            job.wait_for(
                f"query restarted or given up after kill {kills}",
                lambda text, n=kills: len(job.pids("query")) > n or "giving up" in text,
                60,
            )
            time.sleep(0.5)  # let it get going: a crash while it starts would count too
        assert job.proc.wait(60) == 1, job.output()
        text = job.output()
        assert re.search(r"query crashed \d+ times in \d+s.*giving up", text), text
        print(
            f"load and three kills: {loaded:.0f}s; with give-up: {time.monotonic() - started:.0f}s"
        )
    finally:
        stop.set()
        cleanup.close()
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGINT)
        job.proc.wait(60)
    for name in ("simulator", "dashboard", "query", "ingest", "dataflow"):
        assert f"{name:9} stopped" in text
    for port in (s.ingest_port, s.query_port, s.dashboard_port, s.dataflow_metrics_port):
        assert not port_in_use(port), f"port {port} still in use after the main job stopped"
    assert all(row.healthy for row in stack.status()), "the stack it found was stopped"


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("[INFO] Started worker-1\n", None),
        ('{"level":"INFO","msg":"ok"}\n{"level":"ERROR","logger":"fleetpulse.sink","msg":"boom"}\n'
         '{"level":"INFO","msg":"later"}\n', "ERROR fleetpulse.sink: boom"),
        ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
         "ValueError: bad value\n[INFO] Stopped worker-1\n", "ValueError: bad value"),
        ("[ERROR] Worker failed to bind\n", "[ERROR] Worker failed to bind"),
        ("thread 'main' panicked at src/run.rs:1:1:\nno\n", "thread 'main' panicked at src/run.rs:1:1:"),
        ("error: FLEETPULSE_X: bad\n", "error: FLEETPULSE_X: bad"),
    ],
)  # fmt: skip
def test_last_error_line_picks_the_newest_error_like_line(log: str, expected: str | None) -> None:
    assert last_error_line(log) == expected
