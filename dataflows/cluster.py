"""Run the fleet dataflow as a Bytewax cluster of processes on this machine, as one unit.

    python -m dataflows.cluster [-p 2] [-w 1] [FLOW]

Starts ``-p`` processes of ``python -m bytewax.run FLOW -i I -a ADDRESSES -w W`` on free
local ports. A Bytewax cluster lives and dies together: when one process exits, the
others cannot go on (their exchange with it is gone), so this stops them all and exits
with the status of the process that exited first (0 only if every process ended with
0, or when stopped by a signal).
SIGINT/SIGTERM are passed on to every process. The main job supervises this as its
one ``dataflow`` child: a crash of any process restarts the whole cluster from its
recovery checkpoint.

Why processes and not ``-w`` workers in one process: the per-report work is Python, and
one process's workers share one GIL; two processes drain ~1.4x one process on this
machine where two workers in one process drain no more than one (bench/README.md: drain).
Each process serves its metrics on FLEETPULSE_DATAFLOW_METRICS_PORT + its index.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]

FLOW = "dataflows.fleet:build_flow()"
STOP_S = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dataflows.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("-p", "--processes", type=int, default=2, help="processes (2)")
    parser.add_argument("-w", "--workers", type=int, default=1, help="workers per process (1)")
    parser.add_argument("flow", nargs="?", default=FLOW, help=f"import string ({FLOW})")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.workers < 1:
        parser.error("-p and -w must be >= 1")
    addresses = ";".join(f"127.0.0.1:{_free_port()}" for _ in range(args.processes))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", args.flow, "-w", str(args.workers)]
            + (["-i", str(i), "-a", addresses] if args.processes > 1 else [])
        )
        for i in range(args.processes)
    ]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    first = _first_exit(procs)
    if not stopping and any(p.poll() is None for p in procs):
        print(
            f"dataflows.cluster: process {procs.index(first)} exited with {first.returncode}; "
            "stopping the others (a Bytewax cluster runs whole or not at all)",
            file=sys.stderr,
            flush=True,
        )
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    if stopping:
        return 0  # asked to stop: however the processes took the signal
    failed = [p.returncode for p in procs if p.returncode != 0]
    if first.returncode != 0:
        return _exit_status(first.returncode)
    return _exit_status(failed[0]) if failed else 0


def _first_exit(procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Wait for the first of ``procs`` to exit (the one whose exit made the others fail)."""
    by_pid = {p.pid: p for p in procs}
    while True:
        pid, status = os.wait()  # any child; retried after a signal handler ran (PEP 475)
        proc = by_pid.get(pid)
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc


def _exit_status(code: int) -> int:
    """A child's status as ours: killed by signal N (negative) -> 128 + N, like a shell."""
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
