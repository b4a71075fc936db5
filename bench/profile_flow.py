"""Where the dataflow's time goes: py-spy over one process draining a pre-filled topic.

    python -m bench.profile_flow [--robots 10000] [--reports 220000] [--sampled 0]
        [--rules 100 [--quiet]] [--idle]

Writes bench/results/profile-dataflow.txt: the share of samples (inclusive) of the
busiest functions, and of the functions on top of the stack (self time). ``--rules N``
runs the flow with the alert-rules benchmark's N rules (:func:`bench.rules.rule_book`,
the storm; ``--quiet``: the quiet book); ``--idle`` counts time spent waiting too (a
Kafka flush, a Redis round trip).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
from bytewax.recovery import init_db_dir

from bench.common import BENCH, at_least, progress
from bench.rules import rule_book
from bench.workload import Shape, fill, final_orders
from deploy.local.harness import FLOW, isolated, remove_made
from deploy.local.stack import Stack
from fleetpulse.alert_rules import encode_rules
from fleetpulse.settings import Settings, load_settings, to_env
from state.connect import connect
from state.reader import RedisStateReader


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name


def summarize(raw: Path, top: int = 30) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    out = [f"{total} samples\n", "inclusive (share of all samples):"]
    out += [f"  {v / total:6.1%}  {k}" for k, v in inclusive.most_common(top)]
    out += ["", "self (on top of the stack):"]
    out += [f"  {v / total:6.1%}  {k}" for k, v in own.most_common(top)]
    return "\n".join(out) + "\n"


def _drained(reader: RedisStateReader, final: dict[str, int]) -> bool:
    """Whether every robot's live state is its newest report."""
    cursor: str | None = None
    while True:
        page, cursor = reader.list_robots(cursor=cursor, limit=1000)
        if any(st.report.seq != final[st.report.robot_id] for st in page):
            return False
        if cursor is None:
            return reader.summary().total == len(final)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=10_000)
    parser.add_argument("--reports", type=int, default=220_000)
    parser.add_argument(
        "--sampled", type=float, default=Settings().trace_sample_ratio,
        help="share of traced reports (default: the default trace ratio)",
    )  # fmt: skip
    parser.add_argument("--rules", type=int, default=0, help="alert rules (0: none)")
    parser.add_argument("--quiet", action="store_true", help="the quiet book (nothing fires)")
    parser.add_argument("--idle", action="store_true", help="sample waiting threads too")
    parser.add_argument("--out", default="profile-dataflow.txt")
    args = parser.parse_args()
    at_least(parser, args, 0, "rules", "sampled")
    at_least(parser, args, 1, "robots", "reports")
    book = "quiet" if args.quiet else "storm"
    settings = load_settings()
    Stack(settings).up()
    shape = Shape(robots=args.robots, reports=args.reports, sampled=args.sampled)
    final = final_orders(shape)
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            s = isolated(
                msgspec.structs.replace(settings, offline_after_s=3600.0),
                tmp,
                snapshot_interval_s=settings.snapshot_interval_s,
            )
            progress(f"filling: {shape.describe()}")
            fill(s, shape)
            if args.rules:
                rules_file = tmp / "rules.yaml"
                rules_file.write_bytes(encode_rules(rule_book(args.rules, quiet=args.quiet)))
                s = msgspec.structs.replace(s, rules_file=str(rules_file))
            # Recovery set up as build_flow would, so py-spy follows one process (no re-exec).
            recovery = Path(s.recovery_dir)
            recovery.mkdir(parents=True)
            init_db_dir(recovery, s.recovery_partitions)  # type: ignore[no-untyped-call]
            env = {
                **os.environ,
                **to_env(s),
                "BYTEWAX_RECOVERY_DIRECTORY": str(recovery),
                "BYTEWAX_SNAPSHOT_INTERVAL": str(s.snapshot_interval_s),
                "BYTEWAX_RECOVERY_BACKUP_INTERVAL": "0",
            }
            raw = tmp / "raw.txt"
            spy = str(Path(sys.executable).parent / "py-spy")
            cmd = [spy, "record", "-r", "200", "--format", "raw", "-o", str(raw),
                   *(["--idle"] if args.idle else []), "--",
                   sys.executable, "-m", "bytewax.run", FLOW]  # fmt: skip
            progress("draining under py-spy")
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            reader = RedisStateReader(connect(s), s)
            started = time.monotonic()
            while not _drained(reader, final):
                if proc.poll() is not None or time.monotonic() - started > 600:
                    raise SystemExit("the profiled dataflow stopped or took too long")
                time.sleep(0.2)
            subprocess.run(["pkill", "-INT", "-f", f"bytewax.run {FLOW}"], check=False)
            proc.wait(60)
            text = summarize(raw)
    finally:
        remove_made(settings)  # the topics and keys this run made
    out = BENCH / "results" / args.out
    out.write_text(
        f"# python -m bench.profile_flow {' '.join(sys.argv[1:])}\n"
        f"# {shape.describe()}; one dataflow process, recovery on, py-spy at 200 Hz"
        f"{f'; {args.rules} alert rules ({book})' if args.rules else ''}"
        f"{'; waiting counted' if args.idle else ''}\n{text}"
    )
    print(text)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
