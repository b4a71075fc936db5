"""What alert rules cost: the dataflow with no rules and with 100 rules over 10,000 robots,
side by side in one run — the drain of a pre-filled topic, and freshness at a steady rate
through HTTP.

    python -m bench.rules [--robots 10000] [--reports 220000] [--rules 100] [--repeat 2]
        [--rate 2000] [--seconds 15]

The 100 rules (:func:`rule_book`) are what a fleet would write: battery thresholds at
many levels (with durations and hysteresis), status sets, geofence strips over the
site plane, speed limits and error codes; a quarter watch every robot, the rest one of
the workload's four sites or an id pattern, so a robot is in the scope of about 30.
The workload's batteries cycle from 100 % to 20 %, so incidents open and close all
the time (each version written to Redis and the incidents topic). Drain rounds
interleave the two flows (1 process each, recovery on); freshness rounds, interleaved
too, run the ingest server and 2 dataflow processes as users do. Both trace at the
default ratio. Ratios are "with rules / without", of the medians.
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

from bench.common import bar_chart, progress, write_results
from bench.dataflow import _start
from bench.drain import Engine, _timed
from bench.freshness import measure
from bench.workload import Shape, fill
from deploy.local.harness import isolated, remove_made
from deploy.local.stack import Stack
from fleetpulse.alert_rules import RuleBook, encode_rules, parse_rules
from fleetpulse.settings import Settings, load_settings


def rule_book(count: int) -> RuleBook:
    """``count`` rules of the kinds fleets write, over the workload's sites (site-0..3)."""
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
            level = 22 + (i * 7) % 70
            rule |= {"when": {"battery": {"below": level}}, "for_s": (i % 3) * 5,
                     "clear": {"battery": {"above": level + 5}}}  # fmt: skip
        elif kind == 1:
            rule |= {"when": {"status": {"in": ["working"]}}, "for_s": i % 4}
        elif kind == 2:
            x0 = (i * 37) % 360
            rule["when"] = {"pose": {"inside": [[x0, -1], [x0 + 40, -1], [x0 + 40, 2], [x0, 2]]}}
        elif kind == 3:
            rule["when"] = {"speed": {"above": 0.1 + (i % 5) * 0.1}, "battery": {"below": 60}}
        else:
            rule["when"] = {"errors": {"codes": [f"E{i}"]}}
        rules.append(rule)
    return parse_rules({"rules": rules}, "bench rules")


def _starter(s: Settings, tmp: Path, tag: str) -> Callable[[], list[Any]]:
    return lambda: list(_start(s, 1, tmp, tag))


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=10_000)
    parser.add_argument("--reports", type=int, default=220_000)
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds of each measure")
    parser.add_argument("--rate", type=int, default=2000, help="freshness: reports/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="freshness: how long")
    parser.add_argument("--no-record", action="store_true", help="print, write nothing")
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    settings = msgspec.structs.replace(settings, offline_after_s=3600.0, dataflow_metrics_port=0)
    book = rule_book(args.rules)
    drains: dict[str, list[dict[str, Any]]] = {"no rules": [], f"{args.rules} rules": []}
    fresh: dict[str, list[dict[str, Any]]] = {"no rules": [], f"{args.rules} rules": []}
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            rules_file = tmp / "rules.yaml"
            rules_file.write_bytes(encode_rules(book))
            shape = Shape(
                robots=args.robots, reports=args.reports, sampled=settings.trace_sample_ratio
            )
            base = isolated(settings, tmp, snapshot_interval_s=defaults.snapshot_interval_s)
            progress(f"filling {shape.describe()} into {base.topic_reports}")
            total = fill(base, shape)
            for i in range(args.repeat):
                for label, path in (("no rules", ""), (f"{args.rules} rules", str(rules_file))):
                    tag = f"{'r' if path else 'n'}{i}"
                    s = msgspec.structs.replace(
                        base,
                        redis_prefix=f"{base.redis_prefix}{tag}",
                        recovery_dir=str(tmp / f"{base.redis_prefix}{tag}"),
                        rules_file=path,
                    )
                    engine = Engine(f"{label}, round {i + 1}", _starter(s, tmp, tag))
                    drains[label].append(_timed(engine, s, shape, total))
            for i in range(args.repeat):
                for label, path in (("no rules", ""), (f"{args.rules} rules", str(rules_file))):
                    s = msgspec.structs.replace(settings, rules_file=path)
                    progress(f"freshness, {label}, round {i + 1}")
                    fresh[label].append(measure(s, tmp, args.rate, args.seconds, 2, args.robots))
    finally:
        remove_made(settings)
    labels = list(drains)
    rate = {k: statistics.median(r["reports_per_s"] for r in v) for k, v in drains.items()}
    after = {
        k: statistics.median(r["reports_per_s_after_first_write"] for r in v)
        for k, v in drains.items()
    }
    base_label, rules_label = labels
    table = (
        f"{args.rules} rules (a robot in the scope of ~30) over {args.robots:,} robots; drain: "
        f"{total:,} messages, 1 dataflow process, median of {args.repeat} interleaved "
        f"round(s); freshness: {args.rate:,} reports/s through HTTP for {args.seconds:g} s, 2 "
        f"dataflow processes, median of {args.repeat} interleaved round(s); tracing at the "
        f"default ratio ({settings.trace_sample_ratio:g}), recovery on.\n\n"
        "| measure | no rules | with rules | ratio |\n| --- | --- | --- | --- |\n"
        f"| drain, messages/s (start-up included) | {rate[base_label]:,.0f} | "
        f"{rate[rules_label]:,.0f} | {rate[rules_label] / rate[base_label]:.2f} |\n"
        f"| drain, messages/s after the first write | {after[base_label]:,.0f} | "
        f"{after[rules_label]:,.0f} | {after[rules_label] / after[base_label]:.2f} |\n"
    )
    latency = {
        k: {q: statistics.median(r[f"{q}_ms"] for r in v) for q in ("p50", "p99", "max")}
        for k, v in fresh.items()
    }
    for q in ("p50", "p99", "max"):
        a, b = latency[base_label][q], latency[rules_label][q]
        table += f"| freshness {q}, ms (202 → Redis) | {a:g} | {b:g} | {b / max(a, 1):.2f} |\n"
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
        f"Alert rules: {args.rules} rules over {args.robots:,} robots",
    )
    table += f"\n![rules]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-rules  (python -m bench.rules " + " ".join(sys.argv[1:]) + ")"
    results = {"drains": drains, "freshness": fresh, "rules": args.rules, "robots": args.robots}
    out = write_results("rules", results, table, command)
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
