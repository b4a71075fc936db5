"""Pipeline drain by fleet size, side by side: the Bytewax flow (1 process; 1 process x
2 workers; 2 processes, the main job's layout), a raw hand-written loop, and the same job in
Quix Streams — on the same pre-filled topic, one script run.

    python -m bench.drain [--robots 1000 10000 100000] [--reports 220000] [--hot 0.01]
        [--hot-share 0.5] [--disorder 0.2] [--duplicates 0.1] [--sampled RATIO]
        [--repeat 1] [--engines bw1 bw1x2 bw2 raw quix]

For each fleet size the topic (12 partitions) is filled once with the shape a fleet
sends (bench.workload: hot robots, reports out of order, redeliveries, a traceparent
sampled at the default trace ratio) and every engine then reads it from the start into
a Redis prefix of its own, with recovery on at the default snapshot interval. An engine
is timed from its start until the fleet summary counts every robot and a sample of
robots (the hot ones and 200 others) shows each its newest report; after the clock
stops every robot's live state is checked (untimed). Ratios are to the raw loop, the
floor any framework pays its own costs on top of. Quix Streams runs from
``bench/.venv-quix`` (made here on first use: it needs confluent-kafka < 2.13, the
product pins 2.16).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.common import BENCH, REPO, progress, write_results
from bench.dataflow import _start
from bench.workload import Shape, fill, final_count, final_orders
from deploy.local.harness import FlowProcess, isolated, remove_made
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, load_settings, to_env
from state.connect import connect
from state.keys import Keys
from state.reader import RedisStateReader

QUIX_VENV = BENCH / ".venv-quix"
QUIX_PINS = ["quixstreams==3.28.1", "msgspec==0.22.0", "redis[hiredis]==8.1.0"]


def _quix_python() -> Path:
    python = QUIX_VENV / "bin" / "python"
    if not python.exists():
        progress("making bench/.venv-quix for Quix Streams (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *QUIX_PINS], check=True)
    return python


class Engine:
    """One way of running the job: started, watched, stopped."""

    def __init__(self, name: str, start: Callable[[], list[Any]]) -> None:
        self.name = name
        self._start = start
        self._procs: list[Any] = []

    def start(self) -> None:
        self._procs = self._start()

    def alive(self) -> bool:
        # A stop-at-end-of-topic engine that exited 0 has not failed.
        return all(_alive(p) for p in self._procs)

    def stop(self) -> None:
        for p in self._procs:
            _halt(p)


def _alive(p: Any) -> bool:
    if isinstance(p, subprocess.Popen):
        return p.poll() in (None, 0)
    return bool(p.alive())


def _halt(p: Any) -> None:
    if isinstance(p, subprocess.Popen):
        if p.poll() is None:
            p.terminate()
            p.wait(30)
    else:
        p.stop()


def _process(cmd: list[str], s: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **to_env(s), "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _timed(engine: Engine, s: Settings, shape: Shape, total: int) -> dict[str, Any]:
    client = connect(s)
    reader = RedisStateReader(client, s)
    keys = Keys(s.redis_prefix)
    final = final_orders(shape)
    rng = random.Random(shape.seed)
    hot = [r for r, n in zip(final, shape.counts(), strict=True) if n > 2 * total / shape.robots]
    sample = {r: final[r] for r in hot[:100] + rng.sample(sorted(final), min(200, len(final)))}
    name = engine.name
    progress(f"{name}: draining {total:,} messages of {shape.robots:,} robots")
    started = time.monotonic()
    engine.start()
    first: float | None = None
    last_said = started
    try:
        while True:
            now = time.monotonic()
            counted = reader.summary().total
            if first is None and counted > 0:
                first = now
            if counted == shape.robots and final_count(client, keys, sample) == len(sample):
                break
            if not engine.alive():
                raise SystemExit(f"{name} exited before the drain finished")
            if now - started > 900:
                raise SystemExit(f"{name} did not finish in 900 s")
            if now - last_said > 10:
                progress(f"  {now - started:.0f} s: {counted:,} of {shape.robots:,} robots seen")
                last_said = now
            time.sleep(0.1)
        ended = time.monotonic()
    finally:
        engine.stop()
    complete = final_count(client, keys, final)
    if complete != shape.robots:
        raise SystemExit(f"{name}: only {complete} of {shape.robots} robots show their last report")
    took = ended - started
    result = {
        "engine": name,
        "robots": shape.robots,
        "seconds": round(took, 2),
        "reports_per_s": round(total / took),
        "seconds_after_first_write": round(ended - (first or started), 2),
        "reports_per_s_after_first_write": round(total / (ended - (first or started))),
    }
    progress(f"  -> {result['reports_per_s']:,} messages/s ({took:.1f} s, start-up included)")
    return result


ENGINES = {
    "bw1": "(a1) Bytewax flow, 1 process",
    "bw1x2": "(a2) Bytewax flow, 1 process x 2 workers",
    "bw2": "(a3) Bytewax flow, 2 processes (main job)",
    "raw": "(b) raw loop (baseline)",
    "quix": "(c) Quix Streams 3.28",
}


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--reports", type=int, default=220_000)
    parser.add_argument("--hot", type=float, default=0.01)
    parser.add_argument("--hot-share", type=float, default=0.5)
    parser.add_argument("--disorder", type=float, default=0.2)
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument(
        "--sampled", type=float, default=defaults.trace_sample_ratio,
        help="share of reports with a sampled traceparent (default: the default trace ratio)",
    )  # fmt: skip
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds (median)")
    parser.add_argument("--no-record", action="store_true", help="print, write nothing")
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    settings = msgspec.structs.replace(settings, offline_after_s=3600.0, dataflow_metrics_port=0)
    quix = str(_quix_python()) if "quix" in args.engines else ""
    rounds: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            for robots in args.robots:
                shape = Shape(
                    robots=robots, reports=args.reports, hot=args.hot, hot_share=args.hot_share,
                    disorder=args.disorder, duplicates=args.duplicates, sampled=args.sampled,
                )  # fmt: skip
                base = isolated(settings, tmp, snapshot_interval_s=defaults.snapshot_interval_s)
                progress(f"filling {shape.describe()} into {base.topic_reports}")
                total = fill(base, shape)
                shapes.append({"shape": msgspec.to_builtins(shape), "messages": total})

                def own(tag: str, base: Settings = base) -> Settings:
                    return msgspec.structs.replace(
                        base,
                        redis_prefix=f"{base.redis_prefix}{tag}",
                        recovery_dir=str(tmp / f"{base.redis_prefix}{tag}"),
                    )

                def engine(tag: str, s: Settings) -> Engine:
                    starts: dict[str, Callable[[], list[Any]]] = {
                        "bw1": lambda: _start(s, 1, tmp, tag),
                        "bw1x2": lambda: [FlowProcess(s, tmp / f"{tag}.log", ["-w", "2"])],
                        "bw2": lambda: [FlowProcess(s, tmp / f"{tag}.log", processes=2)],
                        "raw": lambda: [
                            _process([sys.executable, "-m", "bench.baseline"], s, tmp / "raw.log")
                        ],
                        "quix": lambda: [
                            _process([quix, "-m", "bench.quix_job"], s, tmp / "quix.log")
                        ],
                    }
                    return Engine(ENGINES[tag], starts[tag])

                for i in range(args.repeat):  # rounds interleave the engines
                    progress(f"{robots:,} robots: round {i + 1} of {args.repeat}")
                    for tag in args.engines:
                        s = own(f"{tag}r{i}")
                        rounds.append(_timed(engine(tag, s), s, shape, total) | {"round": i})
    finally:
        remove_made(settings)  # the topics and keys this run made
    runs = _medians(rounds)
    table = _table(runs, shapes, args.repeat)
    if args.no_record:
        print(table)
        return 0
    png = _plot(runs)
    table += f"\n![drain]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-drain  (python -m bench.drain " + " ".join(sys.argv[1:]) + ")"
    results = {"workloads": shapes, "partitions": 12, "runs": runs, "rounds": rounds}
    out = write_results("drain", results, table, command)
    print(table)
    progress(f"wrote {out} and {png}")
    return 0


def _medians(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (fleet size, engine) summarised: medians, the spread, the ratio to the raw loop."""
    runs: list[dict[str, Any]] = []
    for robots, engine in dict.fromkeys((r["robots"], r["engine"]) for r in rounds):
        mine = [r for r in rounds if r["robots"] == robots and r["engine"] == engine]
        rates = [r["reports_per_s"] for r in mine]
        runs.append({
            "engine": engine, "robots": robots,
            "seconds": statistics.median(r["seconds"] for r in mine),
            "reports_per_s": round(statistics.median(rates)),
            "reports_per_s_min": min(rates), "reports_per_s_max": max(rates),
            "reports_per_s_after_first_write": round(
                statistics.median(r["reports_per_s_after_first_write"] for r in mine)
            ),
        })  # fmt: skip
    for r in runs:
        raw = [x for x in runs if x["robots"] == r["robots"] and x["engine"] == ENGINES["raw"]]
        r["ratio_to_raw"] = round(r["reports_per_s"] / raw[0]["reports_per_s"], 2) if raw else None
    return runs


def _table(runs: list[dict[str, Any]], shapes: list[dict[str, Any]], repeat: int) -> str:
    shape = shapes[0]["shape"]
    text = (
        f"{shape['reports']:,} reports per fleet size ({shape['hot']:.0%} of the robots send "
        f"{shape['hot_share']:.0%} of them, {shape['disorder']:.0%} out of order, "
        f"{shape['duplicates']:.0%} redelivered, traceparent sampled at {shape['sampled']:g}), "
        "12 partitions, recovery on at the default snapshot interval; messages/s = messages "
        f"read (redeliveries included) / seconds from start to final state, start-up "
        f"included; median of {repeat} interleaved round(s) (min–max).\n\n"
        "| robots | engine | seconds | messages/s | ratio to (b) | after first write |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
    )
    for r in runs:
        text += (
            f"| {r['robots']:,} | {r['engine']} | {r['seconds']} | {r['reports_per_s']:,} "
            f"({r['reports_per_s_min']:,}–{r['reports_per_s_max']:,}) | {r['ratio_to_raw']} "
            f"| {r['reports_per_s_after_first_write']:,} |\n"
        )
    return text


def _plot(runs: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for engine in dict.fromkeys(r["engine"] for r in runs):
        mine = [r for r in runs if r["engine"] == engine]
        style = "--" if engine.startswith(("(b)", "(c)")) else "-"
        ax.plot([r["robots"] for r in mine], [r["reports_per_s"] for r in mine], style,
                marker="o", label=engine)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("robots in the fleet (same number of reports)")
    ax.set_ylabel("messages/s (median), start-up included")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Pipeline drain by fleet size, 12 partitions, same Kafka and Redis")
    fig.tight_layout()
    out = BENCH / "results" / "drain.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    sys.exit(main())
