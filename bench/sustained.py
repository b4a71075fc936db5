"""Sustained end to end: a fleet posting over HTTP at a fixed rate, for minutes.

    python -m bench.sustained [--robots 20000] [--rates 10000] [--seconds 300]
                              [--search 12000,15000,20000 --search-seconds 60]

The product runs as the main job runs it (the dataflow with its workers and recovery
on at the default snapshot interval, the ingest server, the default trace ratio), on
the same 2 cores as Kafka, Redis and this load generator. The fleet (``--robots``,
each reporting at ``rate / robots`` Hz with the wall clock as ``ts``) posts batches of
reports every 10 ms to hold the offered rate. Every second the benchmark notes what
was acknowledged (202), the dataflow's consumer lag (its own metric) and the freshness
of what became visible: HTTP 202 -> the robot's state in Redis (the change stream's
entry ids are Redis's clock, same machine). A rate holds when freshness p99 over the
run is at most 1 s and the lag does not grow.

``--search`` then tries higher rates, shorter, and reports the highest that holds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec

from api.auth import hash_token, new_token
from bench.common import BENCH, progress, serve_api, write_results
from deploy.local.harness import FlowProcess, isolated, remove_made
from deploy.local.procs import free_port, port_in_use
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, load_settings, to_env
from state.connect import connect
from state.reader import RedisStateReader

TICK_S = 0.01
HOLDS_P99_MS = 1000


class _SeenReport(msgspec.Struct):
    robot_id: str
    seq: int


class _SeenState(msgspec.Struct):
    report: _SeenReport


class _Seen(msgspec.Struct):
    """The part of a change-stream state event the follower needs (cheap to decode)."""

    type: str
    state: _SeenState | None = None


_seen_dec = msgspec.json.Decoder(_Seen)


class Follower:
    """Notes, per (robot, seq), when its state became visible (Redis's clock, ms)."""

    def __init__(self, reader: RedisStateReader) -> None:
        self.reader = reader
        self.seen: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._after = self.reader.latest_change_id()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry_id, payload in self.reader.changes(self._after, 1000, block_ms=200):
                self._after = entry_id
                event = _seen_dec.decode(payload)
                if event.state is not None:
                    r = event.state.report
                    self.seen.setdefault((r.robot_id, r.seq), int(entry_id.split("-", 1)[0]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


PROCESSES = 2  # the main job's dataflow layout (dataflows.cluster -p 2)


def _lag(port: int) -> int | None:
    """The dataflow's consumer lag over all partitions, from its processes' own metrics
    (process i serves them on ``port + i``)."""
    total = 0.0
    for i in range(PROCESSES):
        # urllib, not httpx.get: each httpx.get builds an SSL context (~15 ms of CPU), a
        # real share of the 2 cores the measured product runs on.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port + i}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        total += sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("fleetpulse_flow_consumer_lag{")
        )
    return int(total)


async def _load(
    url: str, token: str, robots: int, rate: int, seconds: float, acked: dict[Any, int]
) -> int:
    """Post ``rate`` reports/s from ``robots`` robots in 10 ms batches; note each 202 (ms)."""
    per_tick = max(1, round(rate * TICK_S))
    seq = [1] * robots  # seq 0 was the warm-up's
    sent = 0
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/reports/batch HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
        "\r\nContent-Type: application/json\r\nContent-Length: "
    ).encode()
    queue: asyncio.Queue[tuple[list[tuple[str, int]], bytes] | None] = asyncio.Queue()

    async def connection() -> None:
        # A keep-alive HTTP/1.1 connection posting one batch at a time. Not httpx: its pool
        # bookkeeping grows with the requests waiting and took a third of a core here,
        # taken from the product it measures.
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while (item := await queue.get()) is not None:
                batch, body = item
                writer.write(b"%s%d\r\n\r\n%s" % (head, len(body), body))
                status = int((await reader.readline()).split(b" ", 2)[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if status == 202:
                    now_ms = int(time.time() * 1000)
                    for key in batch:
                        acked[key] = now_ms
        finally:
            writer.close()

    connections = [asyncio.create_task(connection()) for _ in range(16)]
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        ts = datetime.now(UTC).isoformat()
        keys = []
        reports = []
        for _ in range(per_tick):
            i = sent % robots
            robot = f"amr-{i:06d}"
            keys.append((robot, seq[i]))
            reports.append(
                {
                    "robot_id": robot,
                    "seq": seq[i],
                    "ts": ts,
                    "status": "moving",
                    "battery": 90.0 - (seq[i] % 600) * 0.1,
                    "pose": {"x": seq[i] * 0.3, "y": i * 0.01, "theta": 0.0},
                    "speed": 0.3,
                    "site": f"site-{i % 4}",
                }
            )
            seq[i] += 1
            sent += 1
        queue.put_nowait((keys, msgspec.json.encode(reports)))
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * TICK_S - time.monotonic()))
    for _ in connections:
        queue.put_nowait(None)  # each connection ends after the batches queued before
    await asyncio.gather(*connections)
    return sent


def _warm_up(url: str, token: str, robots: int, reader: RedisStateReader) -> None:
    """Every robot reports once and is seen in Redis before the clock starts: the fleet
    is running when the measured load begins, as a main job's fleet would be (start-up
    of the dataflow and first-time creation of each robot are not what freshness means)."""
    progress(f"warm-up: {robots:,} robots report once")
    now = datetime.now(UTC).isoformat()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with httpx.Client(headers=headers, timeout=30) as client:
        for first in range(0, robots, 1000):
            batch = [
                {
                    "robot_id": f"amr-{i:06d}", "seq": 0, "ts": now, "status": "idle",
                    "battery": 90.0, "pose": {"x": 0.0, "y": i * 0.01, "theta": 0.0},
                    "speed": 0.0, "site": f"site-{i % 4}",
                }
                for i in range(first, min(robots, first + 1000))
            ]  # fmt: skip
            r = client.post(f"{url}/v1/reports/batch", content=msgspec.json.encode(batch))
            r.raise_for_status()
    deadline = time.monotonic() + 120
    while reader.summary().total < robots:
        if time.monotonic() > deadline:
            raise SystemExit("the warm-up reports did not all reach Redis within 120 s")
        time.sleep(0.2)


def run(base: Settings, tmp: Path, robots: int, rate: int, seconds: float) -> dict[str, Any]:
    """One run at one offered rate; the figures and the per-second series."""
    metrics_port = free_port()
    while any(port_in_use(metrics_port + i) for i in range(PROCESSES)):
        metrics_port = free_port()
    s = isolated(
        base,
        tmp,
        dataflow_metrics_port=metrics_port,
        ingest_port=free_port(),
        snapshot_interval_s=base.snapshot_interval_s,
    )
    token = new_token()
    env = {**to_env(s), "FLEETPULSE_API_TOKENS": f"ingest:{hash_token(token)}"}
    reader = RedisStateReader(connect(s), s)
    flow = FlowProcess(s, tmp / f"flow-{rate}.log", processes=PROCESSES)
    server = serve_api("ingest", env, s.ingest_port)
    follower = Follower(reader)
    acked: dict[tuple[str, int], int] = {}
    series: list[dict[str, Any]] = []
    url = f"http://127.0.0.1:{s.ingest_port}"
    try:
        _warm_up(url, token, robots, reader)
        follower.start()
        stop = threading.Event()

        def sample() -> None:
            started = time.time()
            while not stop.wait(1.0):
                series.append(
                    {
                        "t": round(time.time() - started),
                        "acked": len(acked),
                        "lag": _lag(metrics_port),
                    }
                )

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        progress(f"{rate:,} reports/s from {robots:,} robots for {seconds:g}s")
        sent = asyncio.run(_load(url, token, robots, rate, seconds, acked))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(follower.seen) < len(acked) * 0.999:
            time.sleep(0.5)
        stop.set()
        sampler.join(5)
    finally:
        follower.stop()
        server.terminate()
        server.communicate(timeout=20)
        flow.stop()
    # A robot's states can coalesce within one sink batch; a superseded report counts as
    # visible when its successor became visible.
    by_second: dict[int, list[int]] = {}
    first_ms = min(acked.values(), default=0)
    for (robot, seq), t_acked in acked.items():
        t_seen = follower.seen.get((robot, seq)) or follower.seen.get((robot, seq + 1))
        if t_seen is not None:
            by_second.setdefault((t_acked - first_ms) // 1000, []).append(t_seen - t_acked)
    lat = sorted(x for xs in by_second.values() for x in xs)
    for point in series:
        xs = sorted(by_second.get(point["t"] - 1, []))
        point["p50_ms"] = xs[len(xs) // 2] if xs else None
        point["p99_ms"] = xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else None
    lags = [p["lag"] for p in series if p["lag"] is not None]
    late_lag = lags[len(lags) // 2 :]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
    result: dict[str, Any] = {
        "robots": robots,
        "rate": rate,
        "seconds": seconds,
        "sent": sent,
        "acked": len(acked),
        "acked_per_s": round(len(acked) / seconds),
        "visible": len(lat),
        "p50_ms": lat[len(lat) // 2] if lat else None,
        "p99_ms": p99,
        "max_lag": max(lags, default=None),
        "median_lag_second_half": statistics.median(late_lag) if late_lag else None,
        "series": series,
    }
    result["holds"] = p99 is not None and p99 <= HOLDS_P99_MS and len(lat) >= 0.999 * len(acked)
    progress(
        f"  -> acked {result['acked_per_s']:,}/s, p50 {result['p50_ms']} ms, p99 "
        f"{result['p99_ms']} ms, max lag {result['max_lag']}: "
        f"{'holds' if result['holds'] else 'does not hold'}"
    )
    return result


def _plot(runs: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in runs:
        t = [p["t"] for p in r["series"]]
        label = f"{r['rate']:,}/s, {r['robots']:,} robots"
        top.plot(
            t,
            [p["p99_ms"] if p["p99_ms"] is not None else float("nan") for p in r["series"]],
            label=label,
        )
        bottom.plot(
            t,
            [p["lag"] if p["lag"] is not None else float("nan") for p in r["series"]],
            label=label,
        )
    top.axhline(HOLDS_P99_MS, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("freshness p99 (ms), per second")
    top.set_yscale("log")
    bottom.set_ylabel("consumer lag (reports)")
    bottom.set_xlabel("seconds")
    top.legend(loc="upper left", fontsize=8)
    top.set_title("Sustained HTTP -> Redis: freshness and lag over time")
    fig.tight_layout()
    out = BENCH / "results" / "sustained.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.sustained", description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=20_000)
    parser.add_argument("--rates", default="10000", help="comma-separated offered rates")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--search", default="", help="higher rates to try after, comma-separated")
    parser.add_argument("--search-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    base = load_settings()
    Stack(base).up()
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rate in (int(x) for x in args.rates.split(",") if x):
                runs.append(run(base, Path(tmp), args.robots, rate, args.seconds))
                remove_made(base)
            for rate in (int(x) for x in args.search.split(",") if x):
                runs.append(run(base, Path(tmp), args.robots, rate, args.search_seconds))
                remove_made(base)
                if not runs[-1]["holds"]:
                    break
    finally:
        remove_made(base)
    png = _plot(runs)
    best = max((r["rate"] for r in runs if r["holds"]), default=None)
    table = (
        f"The main job's layout and defaults (trace ratio {base.trace_sample_ratio:g}, "
        f"snapshot every {base.snapshot_interval_s} s); load generator, Kafka and Redis on "
        "the same 2 cores. Freshness = HTTP 202 -> state visible in Redis.\n\n"
        "| offered /s | robots | seconds | acked /s | freshness p50 | p99 | max lag "
        "| holds p99 ≤ 1 s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    for r in runs:
        table += (
            f"| {r['rate']:,} | {r['robots']:,} | {r['seconds']:g} | {r['acked_per_s']:,} "
            f"| {r['p50_ms']} ms | {r['p99_ms']} ms | {r['max_lag']} "
            f"| {'yes' if r['holds'] else 'no'} |\n"
        )
    table += f"\nHighest rate that held: {best:,}/s.\n" if best else "\nNo rate held.\n"
    table += f"\n![sustained]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-sustained" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    write_results("sustained", {"runs": runs, "highest_holding_rate": best}, table, command)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
