"""Ingest benchmark: accepted reports/s and latency on the durable path (202 = acked by Kafka).

    python -m bench.ingest [--seconds 10] [--workers 1 2]

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
from typing import Any

import msgspec
from confluent_kafka.admin import AdminClient

from api.auth import hash_token, new_token
from bench.common import bar_chart, need_tool, progress, run_wrk, serve_api, write_results
from deploy.local.services import ensure_topics
from deploy.local.stack import Stack
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


def _serve(settings: Settings, workers: int, token: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        "FLEETPULSE_INGEST_PORT": str(port),
        "FLEETPULSE_TOPIC_REPORTS": TOPIC,
        "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(token)}",
        "FLEETPULSE_API_WORKERS": str(workers),
        "FLEETPULSE_TRACE_SAMPLE_RATIO": "0.01",
        "FLEETPULSE_LOG_LEVEL": "WARNING",
    }
    return serve_api("ingest", env, port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    wrk = need_tool("wrk", "wrk")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
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
            ("single", "/v1/reports", single, 1, 32),
            ("batch of 1000", "/v1/reports/batch", batch, 1000, 4),
        ]
        for workers in args.workers:
            port = 58181
            server = _serve(settings, workers, token, port)
            try:
                for name, route, body, per_request, conns in scenarios:
                    progress(f"{name}, {workers} worker(s), {conns} connections, {args.seconds}s")
                    script = _LUA % {"token": token, "body": body}
                    url = f"http://127.0.0.1:{port}{route}"
                    r = run_wrk(wrk, url, script, conns, args.seconds, tmp, body.stem)
                    ok = r["requests"] - r["non2xx"]
                    secs = r["duration_us"] / 1e6
                    rows.append({
                        "scenario": name, "workers": workers, "connections": conns,
                        "requests_per_s": round(ok / secs, 1),
                        "reports_per_s": round(ok * per_request / secs, 1),
                        "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
                        "max_ms": r["max_us"] / 1000, "non2xx": r["non2xx"],
                        "socket_errors": r["socket_errors"],
                    })  # fmt: skip
                    last = rows[-1]
                    progress(
                        f"  -> {last['reports_per_s']:.0f} reports/s, "
                        f"p50 {last['p50_ms']:.1f} ms, p99 {last['p99_ms']:.1f} ms"
                    )
            finally:
                server.send_signal(signal.SIGINT)
                server.wait(20)
    table = "| scenario | workers | conns | requests/s | reports/s | p50 ms | p99 ms | non-2xx |\n"
    table += "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    for r in rows:
        table += (
            f"| {r['scenario']} | {r['workers']} | {r['connections']} "
            f"| {r['requests_per_s']:.0f} | {r['reports_per_s']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non2xx']} |\n"
        )
    png = bar_chart(
        "ingest",
        [f"{r['scenario']}, {r['workers']} worker(s)" for r in rows],
        {"accepted reports/s": [r["reports_per_s"] for r in rows]},
        "accepted reports/s (202 = acknowledged by Kafka, acks=all)",
        "Ingest on the durable path",
    )
    table += f"\n![ingest]({png.relative_to(png.parent.parent)})\n"
    command = f"just bench-ingest  (python -m bench.ingest --seconds {args.seconds})"
    out = write_results("ingest", {"rows": rows, "load_tool": "wrk 4.1.0"}, table, command)
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
