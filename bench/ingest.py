"""Ingest benchmark: accepted reports/s and latency on the durable path (202 = acked by Kafka).

    python -m bench.ingest [--seconds 10] [--workers 1 2] [--ratios 1 0.1 0.01 0] [--rounds 3]

Two tables: single posts and batches of 1,000 with 1 and 2 workers at the default
FLEETPULSE_TRACE_SAMPLE_RATIO (or ``--ratio``), then the cost of tracing: single posts
with one worker at each of ``--ratios`` (``--ratios`` alone skips it), ``--rounds``
interleaved rounds, the median round by requests/s. ``--no-record`` prints the tables
without writing bench/results or bench/README.md.

Load tool: wrk (Debian's package, C, epoll; installed on first use). A Python client
on this 2-core machine would saturate a core before the server does, so the figure
would measure the client. wrk posts a fixed body: one report, or a batch of 1,000.
The server is `python -m api.serve ingest` (granian) against the local stack's Kafka.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from confluent_kafka.admin import AdminClient

from api.auth import hash_token, new_token
from bench.common import bar_chart, need_tool, progress, run_wrk, serve_api, write_results
from deploy.local.procs import free_port
from deploy.local.services import ensure_topics
from deploy.local.stack import Stack
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, load_settings

TOPIC = "bench.ingest"

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
local f = io.open("%(body)s", "rb")
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p90_us\\": %%d, " ..
    "\\"p99_us\\": %%d, \\"max_us\\": %%d, \\"non2xx\\": %%d, \\"socket_errors\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def _report(i: int) -> dict[str, Any]:
    return {
        "robot_id": f"bench-{i % 1000}",
        "boot": 0,
        "seq": i,
        # wrk posts this body for the whole run: a ts of now stays inside the server's
        # FLEETPULSE_MAX_AGE_S (7 days by default) throughout.
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "status": "moving",
        "battery": 80.0 - (i % 50),
        "pose": {"x": i * 0.1, "y": 2.0, "theta": 0.5},
        "speed": 1.2,
        "errors": [],
        "site": "plant-1",
    }


def _serve(
    settings: Settings, workers: int, token: str, port: int, ratio: float
) -> subprocess.Popen[bytes]:
    env = {
        "FLEETPULSE_INGEST_PORT": str(port),
        "FLEETPULSE_TOPIC_REPORTS": TOPIC,
        "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(token)}",
        "FLEETPULSE_API_WORKERS": str(workers),
        "FLEETPULSE_TRACE_SAMPLE_RATIO": f"{ratio:g}",
        "FLEETPULSE_LOG_LEVEL": "WARNING",
    }
    return serve_api("ingest", env, port)


class Scenario(NamedTuple):
    name: str
    route: str
    body: Path
    per_request: int  # reports per request
    connections: int


def _run(wrk: str, token: str, port: int, sc: Scenario, seconds: int, tmp: Path) -> dict[str, Any]:
    """One wrk run of ``sc`` against the server on ``port``: its row of figures."""
    script = _LUA % {"token": token, "body": sc.body}
    url = f"http://127.0.0.1:{port}{sc.route}"
    r = run_wrk(wrk, url, script, sc.connections, seconds, tmp, sc.body.stem)
    ok = r["requests"] - r["non2xx"]
    secs = r["duration_us"] / 1e6
    return {
        "scenario": sc.name, "connections": sc.connections,
        "requests_per_s": round(ok / secs, 1),
        "reports_per_s": round(ok * sc.per_request / secs, 1),
        "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000, "non2xx": r["non2xx"],
        "socket_errors": r["socket_errors"],
    }  # fmt: skip


def _said(row: dict[str, Any]) -> str:
    return (
        f"  -> {row['requests_per_s']:.0f} requests/s, {row['reports_per_s']:.0f} reports/s, "
        f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, non-2xx {row['non2xx']}"
    )


def _ratio_sweep(
    settings: Settings, wrk: str, token: str, sc: Scenario, args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    """Single posts, 1 worker, at each sampling ratio; rounds interleaved; median round."""
    runs: dict[float, list[dict[str, Any]]] = {ratio: [] for ratio in args.ratios}
    for round_no in range(1, args.rounds + 1):
        for ratio in args.ratios:
            progress(
                f"tracing ratio {ratio:g}, round {round_no}/{args.rounds}: {sc.name}, 1 worker"
            )
            port = free_port()  # never a port another benchmark's server holds
            server = _serve(settings, 1, token, port, ratio)
            try:
                runs[ratio].append(_run(wrk, token, port, sc, args.seconds, tmp))
            finally:
                server.send_signal(signal.SIGINT)
                server.wait(20)
            progress(_said(runs[ratio][-1]))
    rows = []
    for ratio, done in runs.items():
        by_rate = sorted(done, key=lambda r: r["requests_per_s"])
        median = by_rate[len(by_rate) // 2]
        rows.append({
            **median, "ratio": ratio, "workers": 1,
            "requests_per_s_runs": [r["requests_per_s"] for r in done],
            "p99_ms_runs": [r["p99_ms"] for r in done],
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--ratio", type=float, default=None, help="sampling ratio of the main table "
        "(default: FLEETPULSE_TRACE_SAMPLE_RATIO's default)",
    )  # fmt: skip
    parser.add_argument("--ratios", type=float, nargs="*", default=[1.0, 0.1, 0.01, 0.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print, write nothing")
    args = parser.parse_args()
    settings = load_settings()
    ratio = settings.trace_sample_ratio if args.ratio is None else args.ratio
    Stack(settings).up()
    wrk = need_tool("wrk", "wrk")
    admin = AdminClient(kafka_config(settings))
    ensure_topics(admin, [TOPIC], settings.kafka_partitions, 1, reports_topic=TOPIC)
    token = new_token()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        single = tmp / "single.json"
        single.write_bytes(msgspec.json.encode(_report(1)))
        batch = tmp / "batch.json"
        batch.write_bytes(msgspec.json.encode([_report(i) for i in range(1000)]))
        scenarios = [
            Scenario("single", "/v1/reports", single, 1, 32),
            Scenario("batch of 1000", "/v1/reports/batch", batch, 1000, 4),
        ]
        for workers in args.workers:
            port = free_port()
            server = _serve(settings, workers, token, port, ratio)
            try:
                for sc in scenarios:
                    progress(
                        f"{sc.name}, {workers} worker(s), {sc.connections} connections, "
                        f"{args.seconds}s, tracing ratio {ratio:g}"
                    )
                    rows.append(
                        {**_run(wrk, token, port, sc, args.seconds, tmp), "workers": workers}
                    )
                    progress(_said(rows[-1]))
            finally:
                server.send_signal(signal.SIGINT)
                server.wait(20)
        sweep = _ratio_sweep(settings, wrk, token, scenarios[0], args, tmp) if args.ratios else []
    table = f"Tracing sample ratio {ratio:g} (the default of FLEETPULSE_TRACE_SAMPLE_RATIO).\n\n"
    table += "| scenario | workers | conns | requests/s | reports/s | p50 ms | p99 ms | non-2xx |\n"
    table += "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    for r in rows:
        table += (
            f"| {r['scenario']} | {r['workers']} | {r['connections']} "
            f"| {r['requests_per_s']:.0f} | {r['reports_per_s']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non2xx']} |\n"
        )
    if sweep:
        table += (
            f"\nThe cost of tracing: single posts, 1 worker, {sweep[0]['connections']} "
            f"connections, at each FLEETPULSE_TRACE_SAMPLE_RATIO; median of {args.rounds} "
            "interleaved rounds by requests/s (all rounds in brackets).\n\n"
            "| sample ratio | requests/s | p50 ms | p99 ms | non-2xx |\n"
            "| --- | --- | --- | --- | --- |\n"
        )
        for r in sweep:
            each = ", ".join(f"{x:.0f}" for x in r["requests_per_s_runs"])
            table += (
                f"| {r['ratio']:g} | {r['requests_per_s']:.0f} ({each}) | {r['p50_ms']:.1f} "
                f"| {r['p99_ms']:.1f} | {r['non2xx']} |\n"
            )
    print(table)
    if args.no_record:
        return 0
    png = bar_chart(
        "ingest",
        [f"{r['scenario']}, {r['workers']} worker(s)" for r in rows],
        {"accepted reports/s": [r["reports_per_s"] for r in rows]},
        "accepted reports/s (202 = acknowledged by Kafka, acks=all)",
        "Ingest on the durable path",
    )
    table += f"\n![ingest]({png.relative_to(png.parent.parent)})\n"
    command = f"just bench-ingest  (python -m bench.ingest --seconds {args.seconds})"
    results = {"rows": rows, "ratio": ratio, "ratio_sweep": sweep, "load_tool": "wrk 4.1.0"}
    out = write_results("ingest", results, table, command)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
