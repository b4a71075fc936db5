"""What every benchmark shares: machine facts, tools, results on disk and in the README."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from deploy.local.procs import wait_http_ready
from fleetpulse.errors import StackError

__all__ = ["BENCH", "bar_chart", "machine", "need_tool", "progress", "serve_api", "write_results"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def machine() -> dict[str, Any]:
    """Facts a reader needs to compare runs: commit, cores, memory, versions."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    versions = {}
    for dist in ("bytewax", "confluent-kafka", "redis", "litestar", "msgspec", "granian"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "commit": commit + ("-dirty" if dirty else ""),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "versions": versions,
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def need_tool(name: str, debian_package: str) -> str:
    """The path of a command-line tool, installed with apt-get on first use when root."""
    path = shutil.which(name)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        progress(f"installing {debian_package} with apt-get (first run only)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", debian_package], check=True, env=env)
        path = shutil.which(name)
    if not path:
        raise StackError(f"{name} not found; install Debian's {debian_package}")
    return path


def at_least(
    parser: argparse.ArgumentParser, args: argparse.Namespace, low: float, *names: str
) -> None:
    """Stop with argparse's usage error naming the first of ``names`` (options of
    ``args``) below ``low``."""
    for name in names:
        value = getattr(args, name)
        if not value >= low:  # NaN too
            parser.error(f"--{name.replace('_', '-')} must be at least {low:g}, got {value}")


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def write_results(name: str, results: dict[str, Any], table: str, command: str) -> Path:
    """Write bench/results/<name>.json and replace the <name> section of bench/README.md."""
    out = BENCH / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command, "machine": machine(), **results}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    readme = BENCH / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    m = doc["machine"]
    section = (
        f"{start}\n_Command:_ `{command}` — commit {m['commit']}, {m['when']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}\n\n{table}\n{end}"
    )
    if start in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{section}\n"
    readme.write_text(text)
    return out


def bar_chart(
    name: str, labels: list[str], series: dict[str, list[float]], xlabel: str, title: str
) -> Path:
    """A horizontal grouped bar chart saved as bench/results/<name>.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.45 * len(labels) * max(1, len(series))))
    height = 0.8 / max(1, len(series))
    for i, (legend, values) in enumerate(series.items()):
        ys = [y + i * height for y in range(len(labels))]
        bars = ax.barh(ys, values, height=height, label=legend)
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.0f}", va="center")
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    top = max((v for values in series.values() for v in values), default=1)
    ax.set_xlim(0, top * 1.25)
    if len(series) > 1:
        ax.legend(loc="lower right")
    fig.tight_layout()
    out = BENCH / "results" / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def serve_api(role: str, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """``python -m api.serve ROLE`` with ``env`` on top of ours, once its /readyz answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.serve", role],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_http_ready(f"http://127.0.0.1:{port}/readyz", proc)
    except StackError as exc:
        raise SystemExit(f"the {role} server did not become ready: {exc}") from None
    return proc


def run_wrk(
    wrk: str, url: str, script: str, conns: int, seconds: int, tmp: Path, name: str
) -> dict[str, Any]:
    """Run wrk with a Lua ``script`` whose ``done`` hook prints one ``RESULT {json}`` line."""
    path = tmp / f"{name}.lua"
    path.write_text(script)
    out = subprocess.run(
        [wrk, "-t", "1", "-c", str(conns), "-d", f"{seconds}s", "--timeout", "10s", "-s",
         str(path), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


def latency_summary(latencies_ms: list[int]) -> dict[str, int]:
    """p50, p99 and max of a list of latencies (ms); SystemExit when it is empty."""
    lat = sorted(latencies_ms)
    if not lat:
        raise SystemExit("no report became visible")
    return {
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
    }
