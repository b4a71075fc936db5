"""The main job: the whole product on this machine, with simulated robots reporting.

    python -m deploy.local.main [--robots 10] [--rate 1] [--duration S] [-- SIM_ARGS...]

Starts, in order: the local stack (Kafka, Redis, Jaeger; left alone if already up),
the dataflow (recovery on, 2 workers like the seed's parallelism 2), the ingest server
(58081) and the query server (58080), then the simulator. It prints where to look and
runs until Ctrl-C or ``--duration``; then it stops everything it started, in reverse
order, and nothing else. A fresh pair of dev tokens (ingest, read) is made per run and
printed: the API is never open without one.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from api.auth import hash_token, new_token
from deploy.local.procs import log_tail, wait_http_ready
from deploy.local.stack import REPO_ROOT, Stack
from fleetpulse.errors import FleetpulseError, StackError
from fleetpulse.settings import Settings, load_settings, to_env
from state.keys import Keys

__all__ = ["main"]


class Child:
    """One process this job started, in a session of its own (so Ctrl-C reaches us first)."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path | None = None
    ) -> None:
        self.name = name
        self.log = log
        out = log.open("ab") if log is not None else None
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        if out is not None:
            out.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        print(f"{self.name:9} stopped")

    def failure(self) -> str:
        tail = log_tail(self.log) if self.log else ""
        return f"{self.name} exited with {self.proc.returncode}\n{tail}"


def _where_to_look(s: Settings, read_token: str, ingest_token: str, robot: str) -> str:
    q = f"http://127.0.0.1:{s.query_port}"
    auth = f'-H "Authorization: Bearer {read_token}"'
    key = Keys(s.redis_prefix).robot(robot)
    return f"""
fleetpulse is running — where to look:
  API docs (OpenAPI)  {q}/schema            (JSON: {q}/schema/openapi.json)
  one robot           curl {auth} {q}/v1/robots/{robot}
  fleet summary       curl {auth} {q}/v1/fleet/summary
  live changes (SSE)  curl -N {auth} {q}/v1/stream
  live state in Redis redis-cli -p {s.redis_port} HGETALL '{key}'
  a trace in Jaeger   curl '{s.jaeger_api}/api/traces?service=fleetpulse-dataflow&limit=1'
  metrics             http://127.0.0.1:{s.ingest_port}/metrics  {q}/metrics  http://127.0.0.1:{s.dataflow_metrics_port}/metrics
  logs                {Path(s.stack_dir) / "logs"}/
  dev tokens          read: {read_token}
                      ingest: {ingest_token}
Ctrl-C stops everything this command started.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.local.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=10, help="simulated robots (10)")
    parser.add_argument("--rate", type=float, default=1.0, help="reports/s per robot (1)")
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--workers", type=int, default=2, help="dataflow workers (2)")
    parser.add_argument("sim_args", nargs="*", help="more simulator options, after --")
    args = parser.parse_args(argv)
    if args.robots < 1 or args.rate <= 0 or args.workers < 1:
        parser.error("--robots and --workers must be >= 1 and --rate > 0")
    try:
        base = load_settings()
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    read_token, ingest_token = new_token(), new_token()
    tokens = f"ingest:{hash_token(ingest_token)},read:{hash_token(read_token)}"
    env = {**os.environ, **to_env(base), "FLEETPULSE_API_TOKENS": tokens}
    logs = Path(base.stack_dir)
    logs = (logs if logs.is_absolute() else REPO_ROOT / logs) / "logs"
    stack = Stack(base)
    started_services: list[str] = []
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    py = sys.executable
    try:
        started_services = stack.up()
        logs.mkdir(parents=True, exist_ok=True)
        flow = Child(
            "dataflow",
            [py, "-m", "bytewax.run", "dataflows.fleet:build_flow()", "-w", str(args.workers)],
            env,
            logs / "dataflow.log",
        )
        children.append(flow)
        ingest = Child("ingest", [py, "-m", "api.serve", "ingest"], env, logs / "ingest.log")
        children.append(ingest)
        query = Child("query", [py, "-m", "api.serve", "query"], env, logs / "query.log")
        children.append(query)
        wait_http_ready(f"http://127.0.0.1:{base.ingest_port}/readyz", ingest.proc, 60, ingest.log)
        wait_http_ready(f"http://127.0.0.1:{base.query_port}/readyz", query.proc, 60, query.log)
        if not flow.alive():
            raise StackError(flow.failure())
        print(_where_to_look(base, read_token, ingest_token, "amr-000"), flush=True)
        sim_cmd = [
            py, "-m", "sim",
            "--robots", str(args.robots),
            "--rate", str(args.rate),
            "--url", f"http://127.0.0.1:{base.ingest_port}",
            *args.sim_args,
        ]  # fmt: skip
        sim = Child("simulator", sim_cmd, {**env, "FLEETPULSE_SIM_TOKEN": ingest_token})
        children.append(sim)
        ends = time.monotonic() + args.duration if args.duration else None
        sim_noted = False
        while not stopping:
            for child in children:
                if not child.alive() and child is not sim:
                    raise StackError(child.failure())
            if ends is not None and time.monotonic() >= ends:
                break
            if not sim.alive() and not sim_noted:
                print("the simulator finished; the rest runs on until Ctrl-C", flush=True)
                sim_noted = True
            time.sleep(0.2)
        return 0
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping what this command started ...", flush=True)
        for child in reversed(children):
            child.stop()
        if started_services:
            stack.stop(started_services)


if __name__ == "__main__":
    sys.exit(main())
