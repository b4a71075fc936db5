"""What alert rules cost in the shard step alone: in-process, no Kafka, no Redis.

    python -m bench.rules_step [--robots 5000] [--reports 220000] [--rules 100]
        [--repeat 5] [--grace S]

A fleet reporting once a second (``bench.workload`` with no hot robots: 20 % of the
reports out of order, 10 % twice), each report arriving half a second after its event
time, progress marks every 100 ms of arrival time as the source sends them, and at the
end 12 s more of marks so every held report is judged. The same messages go through
``ShardLogic.on_batch`` with no rules, the quiet book and the storm book of
``bench.rules`` (:func:`bench.rules.rule_book`), in interleaved rounds, with a snapshot
every 2 s of arrival time as Bytewax asks for one. Figures are medians of the rounds;
ratios are to no rules. ``--grace`` runs with another ``dataflows.robot.HOLD_GRACE_S``
(0: a robot is woken as soon as its oldest held report is due, as before it existed).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from datetime import datetime
from typing import Any

import msgspec

from bench.common import at_least, progress, write_results
from bench.rules import books
from bench.workload import Shape, messages
from dataflows import robot
from dataflows.fleet import tune_gc
from dataflows.rules import Rules
from dataflows.shard import Item, ShardLogic
from fleetpulse.settings import Settings

MARK_MS = 100  # a progress mark per 100 ms of arrival time
SNAPSHOT_MS = 2000  # FLEETPULSE_SNAPSHOT_INTERVAL_S's default
DELAY_MS = 500  # from a report's event time to its arrival


def batches(shape: Shape) -> tuple[list[tuple[list[Item], int]], int]:
    """The workload as on_batch calls (at most 500 reports and a progress mark each),
    each with the arrival time (ms) its mark says, and the number of reports."""
    decoder = msgspec.json.Decoder()
    out: list[tuple[list[Item], int]] = []
    batch: list[Item] = []
    last = mark = count = 0
    for count, (key, value, _headers) in enumerate(messages(shape), 1):
        ts = datetime.fromisoformat(decoder.decode(value)["ts"])
        last = max(last, int(ts.timestamp() * 1000) + DELAY_MS)  # arrivals only grow
        mark = mark or last
        batch.append((key.decode(), value, "", 0, count - 1, last))
        if last - mark >= MARK_MS or len(batch) >= 500:
            out.append(([*batch, (0, last)], last))
            mark, batch = last, []
    out.append(([*batch, (0, last)], last))
    for i in range(1, 121):  # 12 s more: every held report judged
        at = last + i * MARK_MS
        out.append(([(0, at)], at))
    return out, count


def run(logic: ShardLogic, work: list[tuple[list[Item], int]]) -> tuple[float, int]:
    """Seconds to step ``work`` through ``logic``, and the incident versions made."""
    made = 0
    next_snapshot = 0
    gc.collect()
    started = time.perf_counter()
    for batch, at in work:
        outs, _ = logic.on_batch(batch)
        for out in outs:
            made += len(out.incidents)
        if at >= next_snapshot:
            logic.snapshot()
            next_snapshot = at + SNAPSHOT_MS
    return time.perf_counter() - started, made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=5000)
    parser.add_argument("--reports", type=int, default=220_000)
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--grace", type=float, default=robot.HOLD_GRACE_S, help="HOLD_GRACE_S, seconds"
    )
    parser.add_argument("--no-record", action="store_true", help="print, write nothing")
    args = parser.parse_args()
    at_least(parser, args, 1, "robots", "reports", "rules", "repeat")
    at_least(parser, args, 0, "grace")
    robot.HOLD_GRACE_S = args.grace
    tune_gc()  # as the dataflow process does
    shape = Shape(robots=args.robots, reports=args.reports, hot=0.0, sampled=0.0)
    progress(f"building {shape.describe()}")
    work, count = batches(shape)
    base = Rules.from_settings(Settings())
    flows = {
        label: base if book is None else msgspec.structs.replace(base, book=book)
        for label, book in books(args.rules).items()
    }
    seconds: dict[str, list[float]] = {label: [] for label in flows}
    made: dict[str, int] = {}
    for i in range(args.repeat):
        for label, rules in flows.items():
            took, made[label] = run(ShardLogic(rules, None, "bench", None), work)
            seconds[label].append(took)
            progress(f"round {i + 1}, {label}: {took:.2f} s, {made[label]:,} incident versions")
    median = {label: statistics.median(v) for label, v in seconds.items()}
    base_s = median["no rules"]
    table = (
        f"The shard step alone, in-process: {count:,} reports of {shape.describe()}, "
        f"arriving {DELAY_MS} ms after their event time, progress marks every {MARK_MS} ms, "
        f"a snapshot every {SNAPSHOT_MS // 1000} s, then 12 s more of marks (every held "
        f"report judged); HOLD_GRACE_S {args.grace:g} s; median of {args.repeat} "
        f"interleaved rounds.\n\n"
        "| rules | µs per report | ratio to no rules | incident versions |\n"
        "| --- | --- | --- | --- |\n"
    )
    for label in flows:
        table += (
            f"| {label} | {median[label] / count * 1e6:.1f} | "
            f"{median[label] / base_s:.2f} | {made[label]:,} |\n"
        )
    if args.no_record:
        print(table)
        return 0
    command = "python -m bench.rules_step " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {"seconds": seconds, "reports": count, "grace_s": args.grace}
    out = write_results("rules-step", results, table, command.strip())
    print(table)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
