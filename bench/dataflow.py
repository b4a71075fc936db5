"""Dataflow benchmark: drain rate and freshness, for 1 and 2 Bytewax processes.

    python -m bench.dataflow [--robots 1000] [--reports 200000] [--rate 2000] [--seconds 15]
        [--hot 0] [--hot-share 0] [--disorder 0] [--duplicates 0] [--sampled 0]

Drain: the reports topic (12 partitions) is filled first; the flow is started and
timed until every robot's live state in Redis is its last report. Two figures: from
process start (includes Python and Bytewax start-up) and from the first state written.

Freshness: with the flow running, reports are produced at a steady rate; each one's
Kafka append time (its CreateTime) is compared with the moment its state change was
written to Redis (the change stream's entry id is Redis's clock in ms, same machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import KafkaError, Message, Producer

from bench.changes import VisibilityLog
from bench.common import bar_chart, latency_summary, progress, write_results
from bench.workload import Shape, fill, final_count, final_orders
from deploy.local.harness import FlowProcess, isolated, produce, remove_made, report
from deploy.local.procs import free_port
from deploy.local.stack import Stack
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, load_settings
from state.connect import connect
from state.keys import Keys
from state.reader import RedisStateReader


def _start(s: Settings, procs: int, tmp: Path, name: str) -> list[FlowProcess]:
    if procs == 1:
        return [FlowProcess(s, tmp / f"{name}.log")]
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(procs))
    return [
        FlowProcess(s, tmp / f"{name}-{i}.log", ["-i", str(i), "-a", addresses])
        for i in range(procs)
    ]


def _stop(flows: list[FlowProcess]) -> None:
    for f in flows:
        f.stop()


def drain(base: Settings, tmp: Path, procs: int, shape: Shape) -> dict[str, Any]:
    s = isolated(base, tmp)
    progress(f"drain, {procs} process(es): filling {shape.describe()}")
    total = fill(s, shape)
    final = final_orders(shape)
    robots = shape.robots
    client = connect(s)
    reader = RedisStateReader(client, s)
    started = time.monotonic()
    flows = _start(s, procs, tmp, f"drain{procs}")
    first: float | None = None
    try:
        while True:
            done = final_count(client, Keys(s.redis_prefix), final)
            now = time.monotonic()
            if first is None and reader.summary().total > 0:
                first = now
            if done == robots:
                break
            if not all(f.alive() for f in flows):
                raise SystemExit("the dataflow exited:\n" + flows[0].output())
            if now - started > 600:
                raise SystemExit(f"drain did not finish in 600 s ({done}/{robots} robots final)")
            time.sleep(0.05)
        ended = time.monotonic()
    finally:
        _stop(flows)
    assert first is not None
    result = {
        "processes": procs,
        "reports": total,
        "robots": robots,
        "seconds_from_start": round(ended - started, 2),
        "seconds_from_first_write": round(ended - first, 2),
        "reports_per_s_from_start": round(total / (ended - started)),
        "reports_per_s_from_first_write": round(total / (ended - first)),
    }
    progress(f"  -> {result['reports_per_s_from_first_write']} reports/s after the first write")
    return result


def freshness(
    base: Settings, tmp: Path, procs: int, rate: int, seconds: int, robots: int
) -> dict[str, Any]:
    s = isolated(base, tmp)
    reader = RedisStateReader(connect(s), s)
    flows = _start(s, procs, tmp, f"fresh{procs}")
    created: dict[tuple[str, int], int] = {}
    visible = VisibilityLog(reader)
    seen = visible.seen
    try:
        produce(s, [(b"warm-up", msgspec.json.encode(report("warm-up", 0)))])
        visible.wait_for_flow("warm-up", flows)
        visible.start()

        def delivered(key: tuple[str, int]) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                if err is None:
                    created[key] = msg.timestamp()[1]

            return on_delivery

        producer = Producer(kafka_config(s, **{"linger.ms": 1}))
        progress(f"freshness, {procs} process(es): {rate} reports/s for {seconds}s")
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) * rate)
            while n < due:
                robot, seq = f"amr-{n % robots:06d}", n // robots + 1
                producer.produce(
                    s.topic_reports,
                    key=robot.encode(),
                    value=msgspec.json.encode(report(robot, seq)),
                    on_delivery=delivered((robot, seq)),
                )
                n += 1
            producer.poll(0.001)
        producer.flush(30)
        deadline = time.monotonic() + 30
        while len(seen) < len(created) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        visible.stop()
        _stop(flows)
    lat = sorted(seen[k] - created[k] for k in created if k in seen)
    result = {
        "processes": procs,
        "rate": rate,
        "sent": len(created),
        "observed": len(lat),
        **latency_summary(lat),
    }
    progress(
        f"  -> p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The shape (bench/workload.py); the defaults are the uniform, in-order shape this
    # benchmark has always recorded. bench-drain records the fleet shape.
    parser.add_argument("--robots", type=int, default=1000)
    parser.add_argument("--reports", type=int, default=200_000)
    parser.add_argument("--hot", type=float, default=0.0)
    parser.add_argument("--hot-share", type=float, default=0.0)
    parser.add_argument("--disorder", type=float, default=0.0)
    parser.add_argument("--duplicates", type=float, default=0.0)
    parser.add_argument("--sampled", type=float, default=0.0)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    settings = msgspec.structs.replace(settings, trace_sample_ratio=0.0, offline_after_s=600.0)
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            shape = Shape(
                robots=args.robots, reports=args.reports, hot=args.hot,
                hot_share=args.hot_share, disorder=args.disorder,
                duplicates=args.duplicates, sampled=args.sampled,
            )  # fmt: skip
            drains = [drain(settings, tmp, p, shape) for p in args.procs]
            fresh = [
                freshness(settings, tmp, p, args.rate, args.seconds, args.robots)
                for p in args.procs
            ]
    finally:
        remove_made(settings)  # the topics and keys this run made
    table = "| measure | processes | figure |\n| --- | --- | --- |\n"
    for d in drains:
        table += (
            f"| drain {d['reports']} reports, {d['robots']} robots | {d['processes']} | "
            f"{d['reports_per_s_from_first_write']} reports/s after the first write "
            f"({d['reports_per_s_from_start']}/s incl. start-up) |\n"
        )
    for f in fresh:
        table += (
            f"| freshness at {f['rate']} reports/s (append → Redis) | {f['processes']} | "
            f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms "
            f"({f['observed']}/{f['sent']} seen) |\n"
        )
    png = bar_chart(
        "dataflow",
        [f"{d['processes']} process(es)" for d in drains],
        {
            "after the first write": [d["reports_per_s_from_first_write"] for d in drains],
            "start-up included": [d["reports_per_s_from_start"] for d in drains],
        },
        "reports/s, pre-filled topic to final live state in Redis",
        "Dataflow drain",
    )
    table += f"\n![dataflow]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-dataflow  (python -m bench.dataflow " + " ".join(sys.argv[1:]) + ")"
    out = write_results("dataflow", {"drain": drains, "freshness": fresh}, table, command)
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
