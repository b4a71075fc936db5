"""Recovery benchmark: how long a killed dataflow takes to be caught up again.

    python -m bench.recovery [--robots 1000,10000,100000] [--workers 2]

For each fleet size: every robot reports twice and the flow (the main job's layout:
one process, ``--workers`` workers, recovery on at the default snapshot interval) reads
it all and snapshots; then it is killed with SIGKILL, every robot reports once more
while it is down, and it is started again. Recovery time = restart -> every robot's
newest report visible in Redis: loading the snapshot (all robots' state), replaying the
last epoch, and reading what came in meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import bar_chart, progress, write_results
from deploy.local.harness import FlowProcess, isolated, produce, remove_made, report, wait_until
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, load_settings
from state.connect import connect
from state.reader import RedisStateReader


def _at(reader: RedisStateReader, seq: int) -> int:
    """How many robots show report ``seq`` as their newest."""
    done, cursor = 0, None
    while True:
        page, cursor = reader.list_robots(cursor=cursor, limit=1000)
        done += sum(1 for st in page if st.report.seq == seq)
        if cursor is None:
            return done


def _fill(s: Settings, robots: int, seq: int) -> None:
    produce(
        s,
        (
            (f"amr-{r:06d}".encode(), msgspec.json.encode(report(f"amr-{r:06d}", seq)))
            for r in range(robots)
        ),
    )


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def one(base: Settings, tmp: Path, robots: int, workers: int) -> dict[str, Any]:
    s = isolated(base, tmp, offline_after_s=3600.0, snapshot_interval_s=base.snapshot_interval_s)
    reader = RedisStateReader(connect(s), s)
    progress(f"{robots:,} robots: filling and reading 2 reports each")
    for seq in (0, 1):
        _fill(s, robots, seq)
    args = ["-w", str(workers)]
    flow = FlowProcess(s, tmp / f"r{robots}-a.log", args)
    try:
        wait_until("the first read", lambda: _at(reader, 1) == robots, 900, [flow])
        time.sleep(2 * s.snapshot_interval_s + 1)  # a snapshot now holds every robot
    finally:
        flow.kill9()
    store = _size_mib(Path(s.recovery_dir))
    _fill(s, robots, 2)  # every robot reports while the flow is down
    progress(f"{robots:,} robots: killed; restarting")
    started = time.monotonic()
    flow = FlowProcess(s, tmp / f"r{robots}-b.log", args)
    try:
        wait_until("caught up", lambda: _at(reader, 2) == robots, 900, [flow])
        took = time.monotonic() - started
    finally:
        flow.stop()
    progress(f"{robots:,} robots: caught up {took:.1f}s after the restart")
    return {"robots": robots, "recovery_s": round(took, 2), "store_mib": round(store, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", default="1000,10000,100000")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.robots.split(",")]
    base = load_settings()
    Stack(base).up()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for robots in sizes:
                rows.append(one(base, Path(tmp), robots, args.workers))
                remove_made(base)
    finally:
        remove_made(base)
    labels = [f"{r['robots']:,} robots" for r in rows]
    bar_chart(
        "recovery",
        labels,
        {"restart -> caught up (s)": [r["recovery_s"] for r in rows]},
        "seconds",
        f"Recovery after kill -9 (1 process, {args.workers} workers)",
    )
    table = (
        f"Every robot reported twice and the flow (1 process x {args.workers} workers, recovery "
        "on at the default snapshot interval) snapshotted it all; then kill -9, one more report "
        "per robot while it was down, restart. Time = restart until every robot's newest "
        "report is in Redis: snapshot load, replay of the last epoch, the reports sent "
        "meanwhile.\n\n"
        "| robots | restart -> caught up | recovery store |\n| --- | --- | --- |\n"
    ) + "".join(
        f"| {r['robots']:,} | {r['recovery_s']:.1f} s | {r['store_mib']:.1f} MiB |\n" for r in rows
    )
    table += "\n![recovery](results/recovery.png)\n"
    command = "just bench-recovery" + (f" --robots {args.robots}" if argv else "")
    write_results("recovery", {"workers": args.workers, "rows": rows}, table, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
