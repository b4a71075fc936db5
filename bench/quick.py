"""The three headline figures in under two minutes, for before and after a change.

    python -m bench.quick [--seconds 5] [--reports 60000]

1. drain at 10,000 robots (bench.workload's fleet shape, 12 partitions, recovery on):
   the Bytewax flow (1 process) over the raw loop, both on the same topic;
2. ingest: single posts/s with one worker at the default trace ratio (wrk);
3. query: ``GET /v1/robots/{id}`` requests/s with one worker, 10,000 robots (wrk).

Each figure is shown beside the recorded one (bench/results/*.json, made by the full
benchmarks). Nothing is written. The machine is noisy: run it twice before believing a
change of less than ~15 %.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka.admin import AdminClient

from api.auth import new_token
from bench import ingest, query
from bench.common import BENCH, need_tool, progress, run_wrk
from bench.dataflow import _start
from bench.drain import ENGINES, Engine, _process, _timed
from bench.workload import Shape, fill
from deploy.local.harness import isolated, remove_made
from deploy.local.procs import free_port
from deploy.local.services import ensure_topics
from deploy.local.stack import Stack
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, load_settings


def _recorded(name: str, pick: Any) -> float | None:
    path = BENCH / "results" / f"{name}.json"
    try:
        return float(pick(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def _drain(settings: Settings, reports: int, tmp: Path) -> tuple[float, float]:
    base = isolated(settings, tmp, snapshot_interval_s=Settings().snapshot_interval_s)
    shape = Shape(robots=10_000, reports=reports, sampled=Settings().trace_sample_ratio)
    progress(f"filling {shape.describe()}")
    total = fill(base, shape)
    rates = []
    for tag in ("bw1", "raw"):
        s = msgspec.structs.replace(
            base, redis_prefix=f"{base.redis_prefix}{tag}", recovery_dir=str(tmp / tag)
        )
        start = (
            (lambda s=s: _start(s, 1, tmp, "bw1"))
            if tag == "bw1"
            else (lambda s=s: [_process([sys.executable, "-m", "bench.baseline"], s, tmp / "r")])
        )
        rates.append(_timed(Engine(ENGINES[tag], start), s, shape, total)["reports_per_s"])
    return rates[0], rates[1]


def _ingest(settings: Settings, seconds: int, tmp: Path) -> float:
    wrk = need_tool("wrk", "wrk")
    admin = AdminClient(kafka_config(settings))
    ensure_topics(admin, [ingest.TOPIC], settings.kafka_partitions, 1, reports_topic=ingest.TOPIC)
    token, port = new_token(), free_port()
    body = tmp / "single.json"
    body.write_bytes(msgspec.json.encode(ingest._report(1)))
    server = ingest._serve(settings, 1, token, port, settings.trace_sample_ratio)
    try:
        progress(f"ingest: single posts, 1 worker, {seconds}s")
        sc = ingest.Scenario("single", "/v1/reports", body, 1, 32)
        row = ingest._run(wrk, token, port, sc, seconds, tmp)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(20)
    return float(row["requests_per_s"])


def _query(settings: Settings, seconds: int, tmp: Path) -> float:
    wrk = need_tool("wrk", "wrk")
    s = msgspec.structs.replace(settings, redis_prefix=query.PREFIX)
    token = new_token()
    query._clear(s)
    try:
        query._seed(s, 10_000)
        args = argparse.Namespace(robots=10_000, connections=32, seconds=seconds)
        server = query._serve(s, 1, token)
        try:
            progress(f"query: GET /v1/robots/{{id}}, 1 worker, {seconds}s")
            lua = query._LUA % {"token": token, "request": query._RANDOM_ROBOT % {"n": 10_000}}
            url = f"http://127.0.0.1:{query.PORT}/v1/robots/bench-00000"
            r = run_wrk(wrk, url, lua, args.connections, seconds, tmp, "quick")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(20)
    finally:
        query._clear(s)
    return float((r["requests"] - r["non2xx"]) / (r["duration_us"] / 1e6))


def _line(name: str, now: float, then: float | None, unit: str) -> str:
    was = f"recorded {then:,.2f}{unit}, now/recorded {now / then:.2f}" if then else "none recorded"
    return f"{name:<44} {now:>10,.2f}{unit}   ({was})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk seconds per HTTP figure")
    parser.add_argument("--reports", type=int, default=60_000, help="reports in the drain")
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    drain_settings = msgspec.structs.replace(
        settings, offline_after_s=3600.0, dataflow_metrics_port=0
    )
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        try:
            flow, raw = _drain(drain_settings, args.reports, tmp)
        finally:
            remove_made(drain_settings)
        posts = _ingest(settings, args.seconds, tmp)
        reads = _query(settings, args.seconds, tmp)

    def drain_ratio(d: dict[str, Any]) -> float:
        runs = [r for r in d["runs"] if r["robots"] == 10_000]
        flow = next(r for r in runs if r["engine"] == ENGINES["bw1"])
        return float(flow["ratio_to_raw"])

    def single(d: dict[str, Any]) -> float:
        return float(next(r for r in d["rows"] if r["scenario"] == "single")["requests_per_s"])

    def robot_get(d: dict[str, Any]) -> float:
        rows = [r for r in d["rows"] if r["workers"] == 1 and "{id}" in r["scenario"]]
        return float(rows[0]["requests_per_s"])

    print()
    print(f"drain at 10,000 robots: flow {flow:,} msgs/s, raw loop {raw:,} msgs/s")
    print(
        _line(
            "drain, flow (1 process) / raw loop", flow / raw, _recorded("drain", drain_ratio), "x"
        )
    )
    print(_line("ingest, single posts/s, 1 worker", posts, _recorded("ingest", single), ""))
    print(_line("query, GET /v1/robots/{id}/s, 1 worker", reads, _recorded("query", robot_get), ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
