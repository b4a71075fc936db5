"""Freshness end to end: HTTP 202 -> the robot's state visible in Redis, at steady rates.

    python -m bench.freshness [--rates 2000 10000] [--seconds 15] [--procs 2] [--robots 1000]

The ingest server (granian, 2 workers) and the dataflow run as users run them. A
load loop posts batches every 10 ms to hold the rate (20 reports a batch at 2,000/s,
100 at 10,000/s, across ``--robots`` robots, 1,000 by default) and notes when each
batch's 202 arrived. A follower reads Redis's change stream, whose entry ids are
Redis's own clock (same machine), and notes when each (robot, seq) became visible. Freshness is the
difference; it can be negative when the state lands before the 202 reaches the client.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from api.auth import hash_token, new_token
from bench.changes import VisibilityLog
from bench.common import bar_chart, latency_summary, progress, serve_api, write_results
from bench.dataflow import _start, _stop
from deploy.local.harness import isolated, remove_made, report
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, load_settings, to_env
from state.connect import connect
from state.reader import RedisStateReader

TICK_S = 0.01


def _serve_ingest(s: Settings, token: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **to_env(s),
        "FLEETPULSE_INGEST_PORT": str(port),
        "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(token)}",
        "FLEETPULSE_API_WORKERS": "2",
    }
    return serve_api("ingest", env, port)


async def _load(
    url: str, token: str, rate: int, seconds: float, acked: dict[Any, int], robots: int
) -> int:
    """Post ``rate`` reports/s in 10 ms batches; note each report's 202 time (ms)."""
    per_tick = max(1, round(rate * TICK_S))
    sent = 0
    limits = httpx.Limits(max_connections=32)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=10) as client:
        tasks: set[asyncio.Task[None]] = set()

        async def post(batch: list[dict[str, Any]]) -> None:
            r = await client.post(f"{url}/v1/reports/batch", content=msgspec.json.encode(batch),
                                  headers={"Content-Type": "application/json"})  # fmt: skip
            now_ms = int(time.time() * 1000)
            if r.status_code == 202:
                for rep in batch:
                    acked[(rep["robot_id"], rep["seq"])] = now_ms

        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < seconds:
            batch = []
            for _ in range(per_tick):
                robot = f"amr-{sent % robots:06d}"
                batch.append(report(robot, sent // robots + 1))
                sent += 1
            task = asyncio.create_task(post(batch))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * TICK_S - time.monotonic()))
        await asyncio.gather(*tasks)
    return sent


def measure(
    base: Settings, tmp: Path, rate: int, seconds: float, procs: int, robots: int
) -> dict[str, Any]:
    s = isolated(base, tmp)
    token = new_token()
    port = free_port()
    reader = RedisStateReader(connect(s), s)
    flows = _start(s, procs, tmp, f"fresh{rate}")
    server = _serve_ingest(s, token, port)
    visible = VisibilityLog(reader)
    seen = visible.seen
    acked: dict[Any, int] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        warm = [report("warm-up", 0)]
        httpx.post(f"{url}/v1/reports/batch", json=warm, timeout=10,
                   headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        visible.wait_for_flow("warm-up", flows)
        visible.start()
        progress(f"freshness at {rate} reports/s for {seconds:g}s, {procs} dataflow process(es)")
        sent = asyncio.run(_load(url, token, rate, seconds, acked, robots))
        deadline = time.monotonic() + 30
        while len(set(acked) - set(seen)) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        visible.stop()
        server.send_signal(signal.SIGINT)
        server.wait(20)
        _stop(flows)
    # A robot's states coalesce within one sink batch: a report superseded before it was
    # written is visible through its successor, so it counts when that one became visible.
    lat: list[int] = []
    for (robot, seq), t_acked in acked.items():
        t_seen = seen.get((robot, seq))
        nxt = seq + 1
        while t_seen is None and nxt <= seq + 50:
            t_seen = seen.get((robot, nxt))
            nxt += 1
        if t_seen is not None:
            lat.append(t_seen - t_acked)
    result = {
        "rate": rate,
        "seconds": seconds,
        "dataflow_processes": procs,
        "sent": sent,
        "acked": len(acked),
        "visible": len(lat),
        **latency_summary(lat),
    }
    progress(
        f"  -> p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--robots", type=int, default=1000, help="robots the reports spread over")
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    settings = msgspec.structs.replace(
        settings, trace_sample_ratio=0.0, offline_after_s=3600.0, dataflow_metrics_port=0
    )
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            rows = [
                measure(settings, Path(tmpdir), r, args.seconds, args.procs, args.robots)
                for r in args.rates
            ]
    finally:
        remove_made(settings)  # the topics and keys this run made
    table = (
        "| rate (reports/s) | dataflow processes | acked | visible | p50 ms | p99 ms | max ms |\n"
    )
    table += "| --- | --- | --- | --- | --- | --- | --- |\n"
    for r in rows:
        table += (
            f"| {r['rate']} | {r['dataflow_processes']} | {r['acked']} | {r['visible']} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |\n"
        )
    png = bar_chart(
        "freshness",
        [f"{r['rate']:,} reports/s" for r in rows],
        {k: [float(r[f"{k}_ms"]) for r in rows] for k in ("p50", "p99", "max")},
        "ms from HTTP 202 to the state visible in Redis",
        f"Freshness end to end ({args.procs} dataflow processes)",
    )
    table += f"\n![freshness]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-freshness  (python -m bench.freshness " + " ".join(sys.argv[1:]) + ")"
    out = write_results("freshness", {"rows": rows}, table, command)
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
