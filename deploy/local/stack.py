"""The local stack: real Kafka, Redis and Jaeger as local processes, one command each way.

    python -m deploy.local.stack up        provision on first use, start, wait until healthy
    python -m deploy.local.stack up --ha   the HA layout: 3 Kafka nodes, Redis master +
                                           replica + 3 Sentinels (and Jaeger)
    python -m deploy.local.stack status    one line per service: pid, port, health
    python -m deploy.local.stack logs [SERVICE] [-n LINES] [-f]
    python -m deploy.local.stack down      stop only the processes this stack started
    python -m deploy.local.stack env       shell exports for the product's processes on
                                           the layout last brought up (none alone)
    python -m deploy.local.stack kill NODE [--signal KILL|STOP|CONT]
                                           fault injection by hand: signal one node
    python -m deploy.local.stack reset     down, then delete the stack's data (not its binaries)
                                           and the dataflow's recovery store

Everything lives under ``FLEETPULSE_STACK_DIR`` (default ``.stack/`` in the repository,
git-ignored). ``up`` is idempotent: a service already running and healthy is left alone.
The layout last brought up is recorded there, so ``status``, ``logs`` and ``down`` cover
every node of it without being told.

The HA layout (README, "High availability"): Kafka nodes 1-3 on the HA Kafka ports
+ 0, 10, 20 (broker 29092, 29102, 29112; controller 29093, 29103, 29113), the Redis
master on the Redis port, its replica on +1 (56380), Sentinels on +11, +12, +13
(56390-56392). :meth:`Stack.client_env` is what the product's processes need to use it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from deploy.local.procs import PidFile, log_tail, port_in_use, spawn
from deploy.local.services import (
    HA_NODES,
    Jaeger,
    Kafka,
    Redis,
    RedisReplica,
    Sentinel,
    Service,
)
from fleetpulse.errors import FleetpulseError, StackError
from fleetpulse.settings import Settings, env_name, load_settings

__all__ = ["REPO_ROOT", "ServiceStatus", "Stack", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceStatus(NamedTuple):
    name: str
    pid: int | None
    port: int
    healthy: bool
    role: str  # e.g. "leads 4/8 partitions", "master, 1 replica(s)"; "" alone


class Stack:
    """The local stack described by one :class:`Settings`: the single-node layout, or
    the HA one (``ha=True``); ``ha=None`` takes the layout last brought up."""

    def __init__(self, settings: Settings, ha: bool | None = None) -> None:
        self.settings = settings
        root = Path(settings.stack_dir)
        self.root = root if root.is_absolute() else REPO_ROOT / root
        self.ha = self.recorded_layout() == "ha" if ha is None else ha
        self.services = self.layout(self.ha)

    def layout(self, ha: bool) -> list[Service]:
        s, root = self.settings, self.root
        if not ha:
            return [Kafka(s, root), Redis(s, root), Jaeger(s, root)]
        return [
            *(Kafka(s, root, n) for n in HA_NODES),
            Redis(s, root),
            RedisReplica(s, root),
            *(Sentinel(s, root, n) for n in HA_NODES),
            Jaeger(s, root),
        ]

    @property
    def _layout_file(self) -> Path:
        return self.root / "run" / "layout"

    def recorded_layout(self) -> str:
        try:
            return self._layout_file.read_text().strip()
        except OSError:
            return "single"

    def client_env(self) -> dict[str, str]:
        """The FLEETPULSE_* variables the product's processes need for this layout: in
        HA, every broker to bootstrap from, 3 copies of each topic, the Sentinels."""
        if not self.ha:
            return {}
        brokers = [s for s in self.services if isinstance(s, Kafka)]
        sentinels = [s for s in self.services if isinstance(s, Sentinel)]
        return {
            env_name("kafka_bootstrap"): ",".join(f"127.0.0.1:{b.port}" for b in brokers),
            env_name("kafka_replication"): str(len(brokers)),
            env_name("redis_sentinels"): ",".join(f"127.0.0.1:{x.port}" for x in sentinels),
        }

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

        Every process is started before any is waited for: a node of the HA Kafka
        cluster is ready only once a majority of the controller quorum runs. Returns the
        names of the services this call started (not those already running).
        """
        self._check_layout()
        chosen = [self.service(n) for n in names] if names else self.services
        self._layout_file.parent.mkdir(parents=True, exist_ok=True)
        self._layout_file.write_text("ha\n" if self.ha else "single\n")
        started = {svc.name: self._start(svc) for svc in chosen}
        for svc in chosen:
            self._wait_started(svc, started[svc.name] is not None)
            pid = self.pidfile(svc).running_pid()
            svc.after_start()
            took = started[svc.name]
            if took is None:
                print(f"{svc.name:13} already running (pid {pid})")
            else:
                took = time.monotonic() - took
                print(f"{svc.name:13} started (pid {pid}, port {svc.port}) in {took:.1f}s")
        if self.ha and not names:
            exports = " ".join(f"{k}={v}" for k, v in self.client_env().items())
            print(f"the product's processes use this layout with: {exports}")
        return [name for name, took in started.items() if took is not None]

    def _wait_started(self, svc: Service, fresh: bool) -> None:
        """Wait until ``svc`` is healthy; start it again (twice at most) if it died of a
        port it found taken although it was free when checked.

        Our ports are in Linux's ephemeral range (32768-60999, the seed's 59092 among
        them): a client reconnecting again and again to a node that is down can be given
        that very port as its own source port and connect to itself (TCP simultaneous
        open), holding the port for a moment. Seen when a killed broker was started again
        while the flow's clients were reconnecting to it.
        """
        for attempt in (1, 2, 3):
            try:
                self._wait_healthy(svc, self.pidfile(svc).running_pid() or 0)
                return
            except StackError as exc:
                taken = "Address already in use" in str(exc)
                if not fresh or not taken or attempt == 3:
                    raise
            print(f"{svc.name:13} found its port taken for a moment; starting it again")
            time.sleep(1.0)
            self._start(svc)

    def _check_layout(self) -> None:
        """Refuse to start one layout while a service only the other one has runs."""
        other = self.layout(not self.ha)
        mine = {svc.name for svc in self.services}
        running = [
            svc.name
            for svc in other
            if svc.name not in mine and self.pidfile(svc).running_pid() is not None
        ]
        if running:
            want, have = ("HA", "single-node") if self.ha else ("single-node", "HA")
            raise StackError(
                f"the {have} stack is running ({', '.join(running)}); stop it with "
                f"`just stack-down` before starting the {want} one"
            )

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named services (only processes this stack started), newest first."""
        for svc in reversed([self.service(n) for n in names]):
            pid = self.pidfile(svc).stop()
            print(f"{svc.name:13} stopped (pid {pid})" if pid else f"{svc.name:13} not running")

    def _start(self, svc: Service) -> float | None:
        """Start ``svc`` unless it runs; the monotonic start time, or None if it ran."""
        pidfile = self.pidfile(svc)
        if pidfile.running_pid() is not None:
            return None
        for setting, port in svc.ports().items():
            if port_in_use(port):
                raise StackError(
                    f"cannot start {svc.name}: port {port} ({env_name(setting)}"
                    f"{f' + {svc.port_offset}' if svc.port_offset else ''}) is already "
                    f"in use by a process this stack did not start; stop that process or set "
                    f"{env_name(setting)} to a free port"
                )
        svc.provision()
        started = time.monotonic()
        pidfile.record(spawn(svc.command(), svc.log_path, cwd=self.root))
        return started

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
        """Stop the processes this stack started, newest first; nothing else is touched.

        Both layouts' processes are stopped. The Sentinels' configs go with them: the
        next start brings the Redis nodes up in their first roles, which is what fresh
        Sentinel configs describe.
        """
        mine = {svc.name for svc in self.services}
        others = [svc for svc in self.layout(not self.ha) if svc.name not in mine]
        for svc in [*reversed(others), *reversed(self.services)]:
            pid = self.pidfile(svc).stop()
            if pid:
                print(f"{svc.name:13} stopped (pid {pid})")
            elif svc.name in mine:
                print(f"{svc.name:13} not running")
            if isinstance(svc, Sentinel):
                svc.config_path.unlink(missing_ok=True)

    def status(self) -> list[ServiceStatus]:
        """Pid, port, health and role in its cluster of every service."""
        rows = []
        for svc in self.services:
            pid = self.pidfile(svc).running_pid()
            healthy = pid is not None and svc.healthy()
            rows.append(ServiceStatus(svc.name, pid, svc.port, healthy, svc.role() if pid else ""))
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
        every = [*self.layout(False), *self.layout(True)]
        data = [f"{svc.name}/data" for svc in every if isinstance(svc, Kafka)]
        data += [f"{svc.name}/formatted.json" for svc in every if isinstance(svc, Kafka)]
        data += [svc.name for svc in every if isinstance(svc, Redis | Sentinel)]
        for sub in (*dict.fromkeys(data), "kafka-ha.cluster-id", "logs", "run"):
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
    for name, pid, port, healthy, role in stack.status():
        state = "healthy" if healthy else ("UNHEALTHY" if pid else "stopped")
        ok = ok and healthy
        print(f"{name:13} {state:9} pid={pid or '-':<8} port={port:<6} {role}".rstrip())
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="provision on first use, start, wait until healthy")
    up.add_argument("services", nargs="*", help="only these (see `status` for the names)")
    up.add_argument(
        "--ha",
        action="store_true",
        help="3 Kafka nodes, Redis master + replica + 3 Sentinels (default: one of each)",
    )
    sub.add_parser("down", help="stop the processes this stack started")
    sub.add_parser("status", help="pid, port and health of each service; exit 1 unless all healthy")
    sub.add_parser("reset", help="down, then delete the stack's data")
    sub.add_parser("env", help="shell exports the product needs on the running layout")
    kill = sub.add_parser("kill", help="signal one node (kill -9 by default): fault injection")
    kill.add_argument("service", help="e.g. kafka-1, redis, sentinel-2")
    kill.add_argument("--signal", choices=("KILL", "STOP", "CONT", "TERM"), default="KILL")
    logs = sub.add_parser("logs", help="the tail of a service's log")
    logs.add_argument("service", nargs="?", help="e.g. kafka, kafka-2, sentinel-1 (default: all)")
    logs.add_argument("-n", "--lines", type=int, default=30)
    logs.add_argument("-f", "--follow", action="store_true")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
        if args.cmd == "up":  # the single-node layout unless asked; named services: the last
            stack = Stack(settings, ha=True if args.ha else (None if args.services else False))
        else:
            stack = Stack(settings)
        if args.cmd == "up":
            stack.up(args.services)
        elif args.cmd == "down":
            stack.down()
        elif args.cmd == "reset":
            stack.reset()
        elif args.cmd == "env":  # a variable already set wins
            for key, value in stack.client_env().items():
                print(f'export {key}="${{{key}:-{value}}}"')
        elif args.cmd == "kill":
            svc = stack.service(args.service)
            pid = stack.pidfile(svc).running_pid()
            if pid is None:
                raise StackError(f"{svc.name} is not running")
            os.kill(pid, getattr(signal, f"SIG{args.signal}"))
            print(f"{svc.name} (pid {pid}) sent SIG{args.signal}")
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
