"""The local stack: real Kafka, Redis and Jaeger as local processes, one command each way.

    python -m deploy.local.stack up        provision on first use, start, wait until healthy
    python -m deploy.local.stack status    one line per service: pid, port, health
    python -m deploy.local.stack logs [SERVICE] [-n LINES] [-f]
    python -m deploy.local.stack down      stop only the processes this stack started
    python -m deploy.local.stack reset     down, then delete the stack's data (not its binaries)
                                           and the dataflow's recovery store

Everything lives under ``FLEETPULSE_STACK_DIR`` (default ``.stack/`` in the repository,
git-ignored). ``up`` is idempotent: a service already running and healthy is left alone.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.local.procs import PidFile, log_tail, port_in_use, spawn
from deploy.local.services import Jaeger, Kafka, Redis, Service
from fleetpulse.errors import FleetpulseError, StackError
from fleetpulse.settings import Settings, env_name, load_settings

__all__ = ["REPO_ROOT", "Stack", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class Stack:
    """The local stack described by one :class:`Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        root = Path(settings.stack_dir)
        self.root = root if root.is_absolute() else REPO_ROOT / root
        self.services: list[Service] = [cls(settings, self.root) for cls in (Kafka, Redis, Jaeger)]

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        names = ", ".join(s.name for s in self.services)
        raise StackError(f"no service named {name!r}; the stack has {names}")

    def pidfile(self, svc: Service) -> PidFile:
        return PidFile(self.root / "run" / f"{svc.name}.pid")

    def up(self, names: Sequence[str] = ()) -> list[str]:
        """Provision and start every service (or those named) and wait until each is healthy.

        Returns the names of the services this call started (not those already running).
        """
        chosen = [self.service(n) for n in names] if names else self.services
        return [svc.name for svc in chosen if self._up_one(svc)]

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named services (only processes this stack started), newest first."""
        for svc in reversed([self.service(n) for n in names]):
            pid = self.pidfile(svc).stop()
            print(f"{svc.name:7} stopped (pid {pid})" if pid else f"{svc.name:7} not running")

    def _up_one(self, svc: Service) -> bool:
        pidfile = self.pidfile(svc)
        pid = pidfile.running_pid()
        if pid is not None:
            self._wait_healthy(svc, pid)
            svc.after_start()
            print(f"{svc.name:7} already running (pid {pid})")
            return False
        for setting, port in svc.ports().items():
            if port_in_use(port):
                raise StackError(
                    f"cannot start {svc.name}: port {port} ({env_name(setting)}) is already "
                    f"in use by a process this stack did not start; stop that process or set "
                    f"{env_name(setting)} to a free port"
                )
        svc.provision()
        started = time.monotonic()
        pid = spawn(svc.command(), svc.log_path, cwd=self.root)
        pidfile.record(pid)
        self._wait_healthy(svc, pid)
        svc.after_start()
        took = time.monotonic() - started
        print(f"{svc.name:7} started (pid {pid}, port {svc.port}) in {took:.1f}s")
        return True

    def _wait_healthy(self, svc: Service, pid: int) -> None:
        deadline = time.monotonic() + self.settings.stack_start_timeout_s
        pidfile = self.pidfile(svc)
        while True:
            if svc.healthy():
                return
            if pidfile.running_pid() is None:
                raise StackError(
                    f"{svc.name} exited during start-up; last lines of {svc.log_path}:\n"
                    f"{log_tail(svc.log_path)}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{svc.name} (pid {pid}) is not healthy after "
                    f"{self.settings.stack_start_timeout_s:.0f}s "
                    f"({env_name('stack_start_timeout_s')}); last lines of {svc.log_path}:\n"
                    f"{log_tail(svc.log_path)}"
                )
            time.sleep(0.25)

    def down(self) -> None:
        """Stop the processes this stack started, newest first; nothing else is touched."""
        self.stop([svc.name for svc in self.services])

    def status(self) -> list[tuple[str, int | None, int, bool]]:
        """(name, pid or None, port, healthy) for every service."""
        rows = []
        for svc in self.services:
            pid = self.pidfile(svc).running_pid()
            rows.append((svc.name, pid, svc.port, pid is not None and svc.healthy()))
        return rows

    @property
    def recovery_dir(self) -> Path | None:
        """The dataflow's recovery store (a relative setting is under the repository), or
        None when recovery is off."""
        if not self.settings.recovery_dir:
            return None
        path = Path(self.settings.recovery_dir)
        return path if path.is_absolute() else REPO_ROOT / path

    def reset(self) -> None:
        """Stop everything and delete the services' data and the dataflow's recovery
        store; provisioned binaries stay.

        The recovery store goes too: its snapshots hold Kafka offsets of the topics just
        deleted, and a dataflow resuming from them would skip that many messages of the
        new topics (and restore robot state that no longer exists anywhere else).
        """
        self.down()
        for sub in ("kafka/data", "kafka/formatted.json", "redis", "logs", "run"):
            path = self.root / sub
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        print(f"stack data under {self.root} deleted")
        self._delete_recovery()

    def _delete_recovery(self) -> None:
        recovery = self.recovery_dir
        if recovery is None or not recovery.exists():
            return
        shown = f"{env_name('recovery_dir')}={self.settings.recovery_dir}"
        found = recovery.resolve()
        # A mistyped setting must not take the repository, the stack's binaries or home.
        keep = {REPO_ROOT.resolve(), self.root.resolve(), Path.home().resolve()}
        if any(found == k or found in k.parents for k in keep):
            print(
                f"warning: recovery store not deleted: {shown} is {found}, which holds the "
                "repository, the stack folder or your home; delete its part-*.sqlite3 by hand"
            )
            return
        shutil.rmtree(recovery)
        print(f"dataflow recovery store {recovery} deleted")


def _print_status(stack: Stack) -> bool:
    ok = True
    for name, pid, port, healthy in stack.status():
        state = "healthy" if healthy else ("UNHEALTHY" if pid else "stopped")
        ok = ok and healthy
        print(f"{name:7} {state:9} pid={pid or '-':<8} port={port}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="provision on first use, start, wait until healthy")
    up.add_argument("services", nargs="*", help="only these (kafka, redis, jaeger)")
    sub.add_parser("down", help="stop the processes this stack started")
    sub.add_parser("status", help="pid, port and health of each service; exit 1 unless all healthy")
    sub.add_parser("reset", help="down, then delete the stack's data")
    logs = sub.add_parser("logs", help="the tail of a service's log")
    logs.add_argument("service", nargs="?", help="kafka, redis or jaeger (default: all)")
    logs.add_argument("-n", "--lines", type=int, default=30)
    logs.add_argument("-f", "--follow", action="store_true")
    args = parser.parse_args(argv)

    try:
        stack = Stack(load_settings())
        if args.cmd == "up":
            stack.up(args.services)
        elif args.cmd == "down":
            stack.down()
        elif args.cmd == "reset":
            stack.reset()
        elif args.cmd == "status":
            return 0 if _print_status(stack) else 1
        elif args.cmd == "logs":
            chosen = [stack.service(args.service)] if args.service else stack.services
            if args.follow:
                paths = [str(s.log_path) for s in chosen]
                return subprocess.call(["tail", "-n", str(args.lines), "-F", *paths])
            for svc in chosen:
                print(f"==> {svc.log_path} <==")
                sys.stdout.write(log_tail(svc.log_path, args.lines))
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
