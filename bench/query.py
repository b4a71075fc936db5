"""Query benchmark: requests/s and latency of the API server's hottest reads.

    python -m bench.query [--seconds 10] [--workers 1 2] [--robots 10000]

10,000 robots (statuses, sites and batteries spread at random, fixed seed) are written
to Redis by the real sink writer under a private key prefix; then `python -m api.serve
query` (granian) answers, for each worker count:

- ``GET /v1/robots/{id}``          a random robot per request (live state: one HGET)
- ``GET /v1/robots?status=charging`` the first page, 100 robots (~1/6 of the fleet match)
- ``GET /v1/fleet/summary``        the sink's counters (one HGETALL)

Load tool: wrk (Debian's package; installed on first use), as in bench.ingest: a
Python client would saturate a core of this 2-core machine before the server. The
key prefix is deleted afterwards.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from api.auth import hash_token, new_token
from bench.common import bar_chart, need_tool, progress, run_wrk, serve_api, write_results
from deploy.local.stack import Stack
from fleetpulse.schema import STATUSES, LiveState, Pose, RobotReport
from fleetpulse.settings import Settings, load_settings
from state import Keys, RedisStateWriter, connect

PREFIX = "benchq"
PORT = 58180

_LUA = """
wrk.headers["Authorization"] = "Bearer %(token)s"
%(request)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p90_us\\": %%d, " ..
    "\\"p99_us\\": %%d, \\"max_us\\": %%d, \\"non2xx\\": %%d, \\"socket_errors\\": %%d, " ..
    "\\"bytes\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout,
    summary.bytes))
end
"""

# A random robot per request; wrk's Lua RNG is seeded per thread.
_RANDOM_ROBOT = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", string.format("/v1/robots/bench-%%05d", math.random(0, %(n)d - 1)))
end
"""


def _fleet(n: int) -> list[LiveState]:
    rng = random.Random(20261126)
    t0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    sites = [f"plant-{i}" for i in range(8)]
    out = []
    for i in range(n):
        ts = t0 + timedelta(milliseconds=rng.randint(0, 60_000))
        report = RobotReport(
            robot_id=f"bench-{i:05d}",
            seq=rng.randint(1, 10_000),
            ts=ts,
            status=rng.choice(STATUSES),
            battery=round(rng.uniform(0, 100), 1),
            pose=Pose(x=rng.uniform(-50, 50), y=rng.uniform(-50, 50), theta=rng.uniform(-3, 3)),
            speed=round(rng.uniform(0, 2), 2),
            site=rng.choice(sites),
        )
        out.append(
            LiveState(
                report=report, last_seen=ts.timestamp(), online=rng.random() < 0.9, status_since=ts
            )
        )
    return out


def _clear(settings: Settings) -> None:
    client = connect(settings)
    try:
        for key in client.scan_iter(match=Keys(settings.redis_prefix).pattern(), count=1000):
            client.delete(key)
    finally:
        client.close()


def _seed(settings: Settings, n: int) -> dict[str, int]:
    client = connect(settings)
    try:
        writer = RedisStateWriter(client, settings)
        fleet = _fleet(n)
        started = time.perf_counter()
        for i in range(0, n, 1000):
            writer.write(fleet[i : i + 1000], [], [])
        progress(f"wrote {n} robots with the sink writer in {time.perf_counter() - started:.2f}s")
    finally:
        client.close()
    return {s: sum(x.report.status == s for x in fleet) for s in STATUSES}


def _serve(settings: Settings, workers: int, token: str) -> subprocess.Popen[bytes]:
    env = {
        "FLEETPULSE_QUERY_PORT": str(PORT),
        "FLEETPULSE_REDIS_PREFIX": settings.redis_prefix,
        "FLEETPULSE_API_TOKENS": f"read:{hash_token(token)}",
        "FLEETPULSE_API_WORKERS": str(workers),
        "FLEETPULSE_TRACE_SAMPLE_RATIO": "0.01",
        "FLEETPULSE_LOG_LEVEL": "WARNING",
    }
    return serve_api("query", env, PORT)


def _measure(
    wrk: str, settings: Settings, workers: int, token: str, args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    """Every scenario against one server with ``workers`` workers."""
    plain = _LUA % {"token": token, "request": ""}
    scenarios = [
        (
            "GET /v1/robots/{id} (random id)",
            "/v1/robots/bench-00000",
            _LUA % {"token": token, "request": _RANDOM_ROBOT % {"n": args.robots}},
        ),
        ("GET /v1/robots?status=charging (100 per page)", "/v1/robots?status=charging", plain),
        ("GET /v1/fleet/summary", "/v1/fleet/summary", plain),
    ]
    rows: list[dict[str, Any]] = []
    server = _serve(settings, workers, token)
    try:
        for name, path, lua in scenarios:
            conns = args.connections
            progress(f"{name}: {workers} worker(s), {conns} connections, {args.seconds}s")
            url = f"http://127.0.0.1:{PORT}{path}"
            r = run_wrk(wrk, url, lua, conns, args.seconds, tmp, "query")
            ok = r["requests"] - r["non2xx"]
            rows.append({
                "scenario": name, "workers": workers, "connections": conns,
                "requests_per_s": round(ok / (r["duration_us"] / 1e6), 1),
                "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000,
                "kib_per_response": round(r["bytes"] / max(r["requests"], 1) / 1024, 1),
                "non2xx": r["non2xx"], "socket_errors": r["socket_errors"],
            })  # fmt: skip
            last = rows[-1]
            progress(
                f"  -> {last['requests_per_s']:.0f} req/s, p50 {last['p50_ms']:.1f} ms, "
                f"p99 {last['p99_ms']:.1f} ms, non-2xx {last['non2xx']}"
            )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(20)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--robots", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    settings = msgspec.structs.replace(load_settings(), redis_prefix=PREFIX)
    Stack(settings).up()
    wrk = need_tool("wrk", "wrk")
    token = new_token()
    _clear(settings)
    rows: list[dict[str, Any]] = []
    try:
        by_status = _seed(settings, args.robots)
        with tempfile.TemporaryDirectory() as tmpdir:
            for workers in args.workers:
                rows += _measure(wrk, settings, workers, token, args, Path(tmpdir))
    finally:
        _clear(settings)
    table = (
        f"{args.robots} robots written by the sink writer ({by_status['charging']} charging); "
        "wrk, 1 thread, on the same 2 cores as the server.\n\n"
        "| route | workers | conns | requests/s | p50 ms | p99 ms | max ms | KiB/resp | non-2xx |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    for r in rows:
        table += (
            f"| {r['scenario']} | {r['workers']} | {r['connections']} "
            f"| {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['max_ms']:.1f} | {r['kib_per_response']} | {r['non2xx']} |\n"
        )
    png = bar_chart(
        "query",
        [f"{r['scenario']}, {r['workers']} worker(s)" for r in rows],
        {"requests/s": [r["requests_per_s"] for r in rows]},
        f"requests/s with {args.robots:,} robots in Redis (wrk, {args.connections} connections)",
        "Query API",
    )
    table += f"\n![query]({png.relative_to(png.parent.parent)})\n"
    command = (
        f"just bench-query  (python -m bench.query --seconds {args.seconds} --robots {args.robots})"
    )
    results = {
        "rows": rows,
        "robots": args.robots,
        "by_status": by_status,
        "load_tool": "wrk 4.1.0",
    }
    out = write_results("query", results, table, command)
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
