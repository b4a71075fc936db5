"""Pipeline drain, side by side: the Bytewax flow (1 and 2 processes), a raw hand-written
loop, and the same job in Quix Streams — one pre-filled topic, one script run.

    python -m bench.drain [--robots 1000] [--reports 200000]

The topic (12 partitions) is filled once; every engine then reads it from the start
into a Redis prefix of its own, and is timed from its start until every robot's live
state is its last report and the windows closed by event time are written. Ratios are
to the raw loop (b), the floor any framework pays its own costs on top of.
Quix Streams runs from ``bench/.venv-quix`` (made here on first use: it needs
confluent-kafka < 2.13, the product pins 2.16).
"""

from __future__ import annotations

import argparse
import os
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
from bench.dataflow import _all_final, _start
from deploy.local.harness import BASE_TS, isolated, produce, remove_made, report
from deploy.local.stack import Stack
from fleetpulse.settings import Settings, load_settings, to_env
from state.connect import connect
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


def _closed_windows(per_robot: int, s: Settings) -> int:
    """Windows closed by event time alone: those ending at or before the last report's
    time minus the allowed lateness (reports are 1 s apart from BASE_TS)."""
    last_ts = BASE_TS + per_robot - 1
    first = BASE_TS // s.window_s * s.window_s
    return max(0, int((last_ts - s.allowed_lateness_s - first) // s.window_s))


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


def _timed(engine: Engine, s: Settings, robots: int, per_robot: int) -> dict[str, Any]:
    reader = RedisStateReader(connect(s), s)
    want_windows = _closed_windows(per_robot, s)
    sample = [f"amr-{r:04d}" for r in range(0, robots, max(1, robots // 20))]
    name = engine.name
    progress(f"{name}: draining {robots * per_robot} reports")
    started = time.monotonic()
    engine.start()
    first: float | None = None
    try:
        while True:
            now = time.monotonic()
            if first is None and reader.summary().total > 0:
                first = now
            if _all_final(reader, robots, per_robot - 1) == robots and all(
                len(reader.stats(r, limit=1000)) >= want_windows for r in sample
            ):
                break
            if not engine.alive():
                raise SystemExit(f"{name} exited before the drain finished")
            if now - started > 900:
                raise SystemExit(f"{name} did not finish in 900 s")
            time.sleep(0.05)
        ended = time.monotonic()
    finally:
        engine.stop()
    total = robots * per_robot
    took = ended - started
    result = {
        "engine": name,
        "seconds": round(took, 2),
        "reports_per_s": round(total / took),
        "seconds_after_first_write": round(ended - (first or started), 2),
        "reports_per_s_after_first_write": round(total / (ended - (first or started))),
    }
    progress(f"  -> {result['reports_per_s']} reports/s ({took:.1f} s, start-up included)")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=1000)
    parser.add_argument("--reports", type=int, default=200_000)
    parser.add_argument("--skip-quix", action="store_true", help="leave Quix Streams out")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args()
    settings = load_settings()
    Stack(settings).up()
    settings = msgspec.structs.replace(
        settings, trace_sample_ratio=0.0, offline_after_s=3600.0, dataflow_metrics_port=0
    )
    per_robot = args.reports // args.robots
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            base = isolated(settings, tmp)
            progress(f"filling {args.robots * per_robot} reports into {base.topic_reports}")
            produce(
                base,
                (
                    (f"amr-{r:04d}".encode(), msgspec.json.encode(report(f"amr-{r:04d}", seq)))
                    for seq in range(per_robot)
                    for r in range(args.robots)
                ),
            )

            rnd = [0]  # the current round: each run writes a Redis prefix of its own

            def own(tag: str) -> Settings:
                tag = f"{tag}r{rnd[0]}"
                return msgspec.structs.replace(
                    base, redis_prefix=f"{base.redis_prefix}{tag}", recovery_dir=str(tmp / tag)
                )

            def flow(procs: int) -> Engine:
                label = f"(a) Bytewax flow, {procs} process{'es' if procs > 1 else ''}"
                return Engine(label, lambda: _start(own(f"bw{procs}"), procs, tmp, f"bw{procs}"))

            engines = [flow(1), flow(2)]
            engines.append(
                Engine(
                    "(b) raw loop (baseline)",
                    lambda: [
                        _process(
                            [sys.executable, "-m", "bench.baseline"], own("raw"), tmp / "raw.log"
                        )
                    ],
                )
            )
            if not args.skip_quix:
                python = str(_quix_python())
                engines.append(
                    Engine(
                        "(c) Quix Streams 3.28",
                        lambda: [
                            _process(
                                [python, "-m", "bench.quix_job"], own("quix"), tmp / "quix.log"
                            )
                        ],
                    )
                )
            tags = ["bw1", "bw2", "raw", "quix"]
            rounds: list[list[dict[str, Any]]] = []
            for i in range(args.repeat):  # rounds interleave the engines: noise hits all alike
                rnd[0] = i
                progress(f"round {i + 1} of {args.repeat}")
                rounds.append(
                    [
                        _timed(e, own(tag), args.robots, per_robot)
                        for e, tag in zip(engines, tags, strict=False)
                    ]
                )
    finally:
        remove_made(settings)  # the topics and keys this run made
    runs = [_median([r[k] for r in rounds]) for k in range(len(rounds[0]))]
    raw = next(r for r in runs if r["engine"].startswith("(b)"))
    for r in runs:
        r["ratio_to_raw"] = round(r["reports_per_s"] / raw["reports_per_s"], 2)
    table = (
        f"Median of {args.repeat} interleaved rounds (min–max in brackets), start-up included.\n\n"
        "| engine | seconds | reports/s | ratio to (b) | reports/s after first write |\n"
        "| --- | --- | --- | --- | --- |\n"
    )
    for r in runs:
        table += (
            f"| {r['engine']} | {r['seconds']} | {r['reports_per_s']} "
            f"({r['reports_per_s_min']}–{r['reports_per_s_max']}) | {r['ratio_to_raw']} "
            f"| {r['reports_per_s_after_first_write']} |\n"
        )
    png = _plot(runs)
    table += f"\n![drain]({png.relative_to(png.parent.parent)})\n"
    command = "just bench-drain  (python -m bench.drain " + " ".join(sys.argv[1:]) + ")"
    meta = {"robots": args.robots, "reports": args.robots * per_robot, "partitions": 12}
    results = {"workload": meta, "runs": runs, "rounds": rounds}
    out = write_results("drain", results, table, command)
    print(table)
    progress(f"wrote {out} and {png}")
    return 0


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's rounds summarised: medians, and the spread of reports/s."""
    rates = [r["reports_per_s"] for r in runs]
    return {
        "engine": runs[0]["engine"],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "reports_per_s": round(statistics.median(rates)),
        "reports_per_s_min": min(rates),
        "reports_per_s_max": max(rates),
        "reports_per_s_after_first_write": round(
            statistics.median(r["reports_per_s_after_first_write"] for r in runs)
        ),
    }


def _plot(runs: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["engine"] for r in runs]
    rates = [r["reports_per_s"] for r in runs]
    bars = ax.barh(names, rates, color=["#4c72b0", "#4c72b0", "#999999", "#dd8452"][: len(runs)])
    for bar, r in zip(bars, runs, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['reports_per_s']:,}/s  ({r['ratio_to_raw']}× raw)", va="center")  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel("reports/s (median), pre-filled topic to final Redis state, start-up included")
    ax.set_xlim(0, max(rates) * 1.45)
    ax.set_title("Pipeline drain: 1,000 robots, 12 partitions, same Kafka and Redis")
    fig.tight_layout()
    out = BENCH / "results" / "drain.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    sys.exit(main())
