"""What alert rules cost: the dataflow with no rules and with 100 rules over 10,000 robots,
side by side in one run — the drain of a pre-filled topic, and freshness at a steady rate
through HTTP.

    python -m bench.rules [--robots 10000] [--reports 660000] [--rules 100] [--repeat 2]
        [--rate 2000] [--seconds 30]

The 100 rules (:func:`rule_book`) are what a fleet would write: battery thresholds at
many levels (with durations and hysteresis), status sets, geofence strips over the
site plane, speed limits and error codes; a quarter watch every robot, the rest one of
the workload's four sites or an id pattern, so a robot is in the scope of about 30.
They run as two books: *quiet*, thresholds the workload never reaches (the cost of
watching), and *storm*, where the workload's cycling batteries, work statuses and
poses open and close incidents all the time (about one report in four makes an
incident version, each written to Redis and the incidents topic; the drain counts
them). Drain rounds interleave the three flows (1 process each, recovery on);
freshness rounds, interleaved too, run the ingest server and 2 dataflow processes as
users do. All trace at the default ratio. Ratios are "with rules / without", of the
medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import Consumer, TopicPartition

from bench.common import at_least, bar_chart, progress, write_results
from bench.dataflow import _start
from bench.drain import Engine, _timed
from bench.freshness import measure
from bench.workload import Shape, fill
from deploy.local.harness import isolated, remove_made
from deploy.local.stack import Stack
from fleetpulse.alert_rules import RuleBook, encode_rules, parse_rules
from fleetpulse.kafka_config import kafka_config
from fleetpulse.settings import Settings, load_settings


def rule_book(count: int, *, quiet: bool = False) -> RuleBook:
    """``count`` rules of the kinds fleets write, over the workload's sites (site-0..3).

    The default book is a storm on the bench workload: its batteries cycle from 100 %
    to 20 % every 400 reports, every robot is "working" one report in 50 (its first
    among them) and crosses the geofence strips as it moves, so about one report in
    four makes an incident version. ``quiet`` keeps every rule, scope, duration and
    clause kind but sets thresholds the workload never reaches (batteries under 20 %,
    the error status, strips beside its path, speeds over 1 m/s): the rules watch
    every report and nothing fires, as on a fleet with nothing wrong.
    """
    rules: list[dict[str, Any]] = []
    for i in range(count):
        kind = i % 5
        scope: dict[str, Any] = {}
        if i % 4:  # three in four are scoped: a site, or an id pattern
            scope = {"sites": [f"site-{i % 4}"]} if i % 3 else {"pattern": f"amr-00{i % 10}.*"}
        rule: dict[str, Any] = {
            "name": f"r{i:03d}",
            "severity": ["info", "warning", "critical"][i % 3],
        }
        if scope:
            rule["scope"] = scope
        if kind == 0:
            level = 5 + i % 10 if quiet else 22 + (i * 7) % 70
            rule |= {"when": {"battery": {"below": level}}, "for_s": (i % 3) * 5,
                     "clear": {"battery": {"above": level + 5}}}  # fmt: skip
        elif kind == 1:
            statuses = ["error"] if quiet else ["working"]
            rule |= {"when": {"status": {"in": statuses}}, "for_s": i % 4}
        elif kind == 2:
            x0, y0 = (i * 37) % 360, 5 if quiet else -1
            strip = [[x0, y0], [x0 + 40, y0], [x0 + 40, y0 + 3], [x0, y0 + 3]]
            rule["when"] = {"pose": {"inside": strip}}
        elif kind == 3:
            floor = 1.1 if quiet else 0.1
            rule["when"] = {"speed": {"above": floor + (i % 5) * 0.1}, "battery": {"below": 60}}
        else:
            rule["when"] = {"errors": {"codes": [f"E{i}"]}}
        rules.append(rule)
    return parse_rules({"rules": rules}, "bench rules")


def books(count: int) -> dict[str, RuleBook | None]:
    """The benchmark's three flows by label: no rules, the quiet book, the storm."""
    return {
        "no rules": None,
        f"{count} quiet": rule_book(count, quiet=True),
        f"{count} storm": rule_book(count),
    }


def incident_versions(s: Settings) -> int:
    """Messages on the incidents topic so far (its partitions' end offsets, summed)."""
    consumer = Consumer(kafka_config(s, **{"group.id": "fleetpulse-bench-rules"}))
    try:
        topic = consumer.list_topics(s.topic_incidents, timeout=10).topics[s.topic_incidents]
        if topic.error is not None:
            return 0  # not made yet: nothing written
        ends = [
            consumer.get_watermark_offsets(TopicPartition(s.topic_incidents, p), timeout=10)[1]
            for p in topic.partitions
        ]
        return sum(ends)
    finally:
        consumer.close()


def _starter(s: Settings, tmp: Path, tag: str) -> Callable[[], list[Any]]:
    return lambda: list(_start(s, 1, tmp, tag))


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=10_000)
    # 660,000: the ordinary robots' reports span 30 s of event time, three times the
    # lateness, so most reports are judged during the drain (a report waits for the
    # robot's watermark, 10 s behind; with the fleet benches' 220,000, spanning 10 s,
    # nearly every report would be judged after the last state was written).
    parser.add_argument("--reports", type=int, default=660_000)
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds of each measure")
    parser.add_argument("--rate", type=int, default=2000, help="freshness: reports/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="freshness: how long")
    parser.add_argument("--no-record", action="store_true", help="print, write nothing")
    args = parser.parse_args()
    at_least(parser, args, 1, "robots", "reports", "rules", "repeat", "rate", "seconds")
    settings = load_settings()
    Stack(settings).up()
    settings = msgspec.structs.replace(settings, offline_after_s=3600.0, dataflow_metrics_port=0)
    n = args.rules
    by_label = books(n)
    drains: dict[str, list[dict[str, Any]]] = {label: [] for label in by_label}
    fresh: dict[str, list[dict[str, Any]]] = {label: [] for label in by_label}
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            files: dict[str, str] = {}  # label -> its rules file ("": none)
            for label, book in by_label.items():
                path = tmp / f"rules-{label.split()[-1]}.yaml"
                if book is not None:
                    path.write_bytes(encode_rules(book))
                files[label] = "" if book is None else str(path)
            shape = Shape(
                robots=args.robots, reports=args.reports, sampled=settings.trace_sample_ratio
            )
            base = isolated(settings, tmp, snapshot_interval_s=defaults.snapshot_interval_s)
            progress(f"filling {shape.describe()} into {base.topic_reports}")
            total = fill(base, shape)
            for i in range(args.repeat):
                for j, label in enumerate(by_label):
                    tag = f"b{j}r{i}"
                    s = msgspec.structs.replace(
                        base,
                        redis_prefix=f"{base.redis_prefix}{tag}",
                        recovery_dir=str(tmp / f"{base.redis_prefix}{tag}"),
                        rules_file=files[label],
                    )
                    engine = Engine(f"{label}, round {i + 1}", _starter(s, tmp, tag))
                    before = incident_versions(s)
                    result = _timed(engine, s, shape, total)
                    result["incident_versions"] = incident_versions(s) - before
                    drains[label].append(result)
            for i in range(args.repeat):
                for label in by_label:
                    s = msgspec.structs.replace(settings, rules_file=files[label])
                    progress(f"freshness, {label}, round {i + 1}")
                    fresh[label].append(measure(s, tmp, args.rate, args.seconds, 2, args.robots))
    finally:
        remove_made(settings)
    labels = list(by_label)
    rate = {k: statistics.median(r["reports_per_s"] for r in v) for k, v in drains.items()}
    after = {
        k: statistics.median(r["reports_per_s_after_first_write"] for r in v)
        for k, v in drains.items()
    }
    made = {k: statistics.median(r["incident_versions"] for r in v) for k, v in drains.items()}
    latency = {
        k: {q: statistics.median(r[f"{q}_ms"] for r in v) for q in ("p50", "p99", "max")}
        for k, v in fresh.items()
    }
    base_label, quiet_label, storm_label = labels

    def row(what: str, values: dict[str, float], fmt: str, ratios: bool = True) -> str:
        cells = [format(values[k], fmt) for k in labels]
        if ratios:
            b = max(values[base_label], 1)
            cells += [f"{values[quiet_label] / b:.2f}", f"{values[storm_label] / b:.2f}"]
        else:
            cells += ["", ""]
        return f"| {what} | " + " | ".join(cells) + " |\n"

    table = (
        f"{n} rules (a robot in the scope of ~30) over {args.robots:,} robots, as two books "
        f"(`bench.rules.rule_book`): *quiet*, thresholds the workload never reaches (the "
        f"rules watch every report, nothing fires), and *storm*, the same rules set off by "
        f"the workload's cycling batteries, work statuses and poses. Drain: {total:,} "
        f"messages ({shape.describe()}; the ordinary robots' reports span "
        f"{shape.counts()[-1]} s of event time, and a report is judged once the robot's "
        f"watermark, {settings.allowed_lateness_s:g} s behind, has passed it), timed until "
        f"every robot shows its last state; 1 dataflow process, median of {args.repeat} "
        f"interleaved round(s); "
        f"freshness: {args.rate:,} reports/s through HTTP for {args.seconds:g} s, 2 dataflow "
        f"processes, median of {args.repeat} interleaved round(s), its reports (moving "
        f"robots at full battery) setting off neither book; tracing at the default "
        f"ratio ({settings.trace_sample_ratio:g}), recovery on. Ratios are to no rules.\n\n"
        f"| measure | no rules | {quiet_label} | {storm_label} | quiet ratio | storm ratio |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        + row("drain, messages/s (start-up included)", rate, ",.0f")
        + row("drain, messages/s after the first write", after, ",.0f")
        + row("drain, incident versions written by then", made, ",.0f", ratios=False)
    )
    for q in ("p50", "p99", "max"):
        table += row(
            f"freshness {q}, ms (202 → Redis)", {k: float(latency[k][q]) for k in labels}, "g"
        )
    if args.no_record:
        print(table)
        return 0
    png = bar_chart(
        "rules",
        ["drain (k messages/s)", "freshness p50 (ms)", "freshness p99 (ms)"],
        {
            label: [
                rate[label] / 1000,
                float(latency[label]["p50"]),
                float(latency[label]["p99"]),
            ]
            for label in labels
        },
        "",
        f"Alert rules: {n} rules over {args.robots:,} robots",
    )
    table += f"\n![rules]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-rules  (python -m bench.rules " + " ".join(sys.argv[1:]) + ")"
    results = {"drains": drains, "freshness": fresh, "rules": n, "robots": args.robots}
    out = write_results("rules", results, table, command)
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
