"""The main job: the whole product on this machine, with simulated robots reporting.

    python -m deploy.local.main [--robots 10] [--rate 1] [--duration S] [--logs DIR]
                                [--ha] [-- SIM_ARGS...]

Starts, in order: the local stack (Kafka, Redis, Jaeger; left alone if already up),
the dataflow (recovery on; 2 processes of 1 worker, the seed's parallelism 2, as one
supervised unit through ``dataflows.cluster``), the ingest server (58081), the query
server (58080), the dashboard (58082) and the notifier (incidents -> webhooks), then the
simulator. The alert rules are FLEETPULSE_RULES_FILE, or a copy of the example rules
(``deploy/rules/example.yaml``) in ``<stack dir>/rules.yaml``. It prints where to look and
runs until Ctrl-C or ``--duration``; then it stops everything it started, in reverse
order, and nothing else. A fresh pair of dev tokens (ingest, read) is made per run and
printed: the API is never open without one. Redis is reached with least privilege: the
dataflow as the stack's writer user, the query server and dashboard as its read-only
user (``state.acl``; passwords in ``<stack dir>/redis-users.json``). ``--ha`` runs it
all on the HA stack (3 Kafka brokers, Redis through Sentinel: ``deploy.local.stack``),
where a broker or the Redis master may be killed by hand (README, "High availability").

Supervision: a child that exits when it should not (the dataflow, ingest or query server
at all, the simulator with a non-zero status) loses its whole process group (granian's
workers would hold the port) and is started again with the same command after a back-off
of 1 s doubling to 30 s; a run of a minute resets it. The dataflow resumes from its
recovery checkpoint. One line per restart gives the exit status and the last error line
of the child's log. Five crashes of one child within a minute stop the job, saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec

from api.auth import hash_token, new_token
from deploy.local.procs import last_error_line, wait_http_ready
from deploy.local.services import Redis
from deploy.local.stack import REPO_ROOT, Stack
from fleetpulse.errors import ConfigError, FleetpulseError, StackError
from fleetpulse.settings import Settings, env_name, load_settings, to_env
from state.acl import RedisUsers
from state.connect import READER, WRITER, check
from state.keys import Keys

__all__ = ["Backoff", "Child", "RestartPolicy", "Supervisor", "main"]

_FLOW = "dataflows.fleet:build_flow()"
_ERROR_TAIL_BYTES = 64 * 1024  # how much of a log's end is searched for the last error line


class RestartPolicy(NamedTuple):
    """How crashed children are restarted, and when the job stops trying."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0  # a run at least this long resets the back-off
    max_crashes: int = 5  # this many crashes of one child ...
    window_s: float = 60.0  # ... within this long: give up


class Backoff:
    """One child's crash record under a policy: the delay before each restart, or none."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.streak = 0  # crashes since the last healthy run
        self.recent: deque[float] = deque()  # crash times within the window

    def crashed(self, now: float, ran_s: float) -> float | None:
        """Record a crash after a run of ``ran_s``; the delay before restarting, None to give up."""
        p = self.policy
        self.streak = 1 if ran_s >= p.healthy_after_s else self.streak + 1
        self.recent.append(now)
        while self.recent and self.recent[0] < now - p.window_s:
            self.recent.popleft()
        if len(self.recent) >= p.max_crashes:
            return None
        return float(min(p.max_delay_s, p.first_delay_s * 2 ** (self.streak - 1)))


def describe_exit(code: int) -> str:
    """An exit status as people read it: ``1``, ``-9 (signal SIGKILL)``."""
    if code >= 0:
        return str(code)
    try:
        return f"{code} (signal {signal.Signals(-code).name})"
    except ValueError:
        return f"{code} (signal {-code})"


class Child:
    """One process this job runs, each run in a session of its own (so Ctrl-C reaches us
    first and a crash can be cleared as a whole process group)."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        log: Path | None = None,
        *,
        may_finish: bool = False,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log = log
        self.may_finish = may_finish  # exiting with 0 is the end of its work, not a crash
        self.finished = False
        self.restarts = 0
        self.started_at = 0.0
        self.log_start = 0  # where this run's output begins in the log
        self.proc: subprocess.Popen[bytes] | None = None
        self._group_cleared = False

    def start(self) -> subprocess.Popen[bytes]:
        out = self.log.open("ab") if self.log is not None else None
        self.log_start = out.tell() if out is not None else 0
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        if out is not None:
            out.close()
        self._group_cleared = False
        self.started_at = time.monotonic()
        again = f" (restart {self.restarts})" if self.restarts else ""
        print(f"{self.name:9} started, pid {self.proc.pid}{again}", flush=True)
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        """The status of a run that ended, None while it runs or before it started."""
        return None if self.proc is None else self.proc.poll()

    def kill_group(self) -> None:
        """SIGKILL what is left of the run's process group once its leader has exited.

        Done once, right when the exit is seen: while members remain, their group id cannot
        be reused; once the group is empty, a later signal could reach a stranger.
        """
        if self.proc is not None and not self._group_cleared:
            self._group_cleared = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def last_error(self) -> str:
        """The last error line this run wrote to its log, or a note that there is none."""
        if self.log is None:
            return "(no log)"
        try:
            with self.log.open("rb") as f:
                f.seek(max(self.log_start, f.seek(0, os.SEEK_END) - _ERROR_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        line = last_error_line(text)
        return "(no error line)" if line is None else line[:300]

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None and self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.kill_group()  # a crash not yet seen may have left workers behind
        print(f"{self.name:9} stopped", flush=True)


class Supervisor:
    """Restarts the children that exit when they should not, with back-off, until one
    crashes too often; then :meth:`check` raises StackError saying which and why."""

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.children: list[Child] = []
        self._backoff: dict[str, Backoff] = {}
        self._restart_at: dict[str, float] = {}  # children waiting out their back-off

    def start(self, child: Child) -> subprocess.Popen[bytes]:
        """Start ``child`` and watch it from now on."""
        self.children.append(child)
        self._backoff[child.name] = Backoff(self.policy)
        return child.start()

    def check(self) -> None:
        """Notice exits and start whatever has waited out its back-off; call it often."""
        now = time.monotonic()
        for child in self.children:
            due = self._restart_at.get(child.name)
            if due is not None:
                if now >= due:
                    del self._restart_at[child.name]
                    child.restarts += 1
                    child.start()
                continue
            code = child.exit_code()
            if code is None or child.finished:
                continue
            child.kill_group()
            if code == 0 and child.may_finish:
                child.finished = True
                print(f"the {child.name} finished; the rest runs on until Ctrl-C", flush=True)
                continue
            self._crashed(child, code, now)

    def _crashed(self, child: Child, code: int, now: float) -> None:
        why = f"exited with {describe_exit(code)}; last error line: {child.last_error()}"
        delay = self._backoff[child.name].crashed(now, now - child.started_at)
        if delay is None:
            p = self.policy
            raise StackError(
                f"{child.name} crashed {p.max_crashes} times in {p.window_s:g}s, last {why}; "
                f"giving up (its log: {child.log or 'this output'})"
            )
        print(f"{child.name:9} {why}; restart {child.restarts + 1} in {delay:g}s", flush=True)
        self._restart_at[child.name] = now + delay

    def stop_all(self) -> None:
        """Stop every child, the last started first."""
        self._restart_at.clear()
        for child in reversed(self.children):
            child.stop()


class Tokens(NamedTuple):
    """The dev tokens of one run, one per scope."""

    read: str
    ingest: str
    admin: str

    @classmethod
    def new(cls) -> Tokens:
        return cls(new_token(), new_token(), new_token())

    @classmethod
    def kept(cls, path: Path) -> Tokens:
        """The tokens kept in ``path`` (JSON, mode 0600), made and kept there on first use."""
        if path.exists():
            return cls(**json.loads(path.read_text()))
        tokens = cls.new()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(tokens._asdict()))
        return tokens

    def setting(self) -> str:
        """Their FLEETPULSE_API_TOKENS entries (hashes only)."""
        return ",".join(f"{scope}:{hash_token(token)}" for scope, token in self._asdict().items())


def _where_to_look(s: Settings, logs: Path, tokens: Tokens, robot: str) -> str:
    q = f"http://127.0.0.1:{s.query_port}"
    auth = f'-H "Authorization: Bearer {tokens.read}"'
    admin = f'-H "Authorization: Bearer {tokens.admin}"'
    key = Keys(s.redis_prefix).robot(robot)
    return f"""
fleetpulse is running — where to look:
  dashboard           http://127.0.0.1:{s.dashboard_port}/   (paste the read token below)
  API docs (OpenAPI)  {q}/schema            (JSON: {q}/schema/openapi.json)
  one robot           curl {auth} {q}/v1/robots/{robot}
  fleet summary       curl {auth} {q}/v1/fleet/summary
  live changes (SSE)  curl -N {auth} {q}/v1/stream
  live state in Redis redis-cli -p {_redis_port(s)} HGETALL '{key}'
  a trace in Jaeger   curl '{s.jaeger_api}/api/traces?service=fleetpulse-dataflow&limit=1'
  metrics             http://127.0.0.1:{s.ingest_port}/metrics  {q}/metrics  http://127.0.0.1:{s.dataflow_metrics_port}/metrics
  a stuck robot       curl -X POST {admin} http://127.0.0.1:{s.ingest_port}/v1/robots/{robot}/reset-order
  open incidents      curl {auth} '{q}/v1/incidents?state=open'
  alert rules         {s.rules_file}  (or curl {admin} http://127.0.0.1:{s.ingest_port}/v1/rules)
  logs                {logs}/
{_HA_LINES if s.redis_sentinels else ""}  dev tokens          read: {tokens.read}
                      ingest: {tokens.ingest}
                      admin: {tokens.admin}
Ctrl-C stops everything this command started.
"""


def _rules_copy(s: Settings) -> Path:
    """``<stack dir>/rules.yaml``, copied from the example rules on first use."""
    copy = REPO_ROOT / s.stack_dir / "rules.yaml"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / "deploy" / "rules" / "example.yaml", copy)
    return copy


def _metrics_urls(s: Settings, processes: int) -> str:
    """The /metrics of the ingest server and of each dataflow process, for the dashboard."""
    urls = [f"http://127.0.0.1:{s.ingest_port}/metrics"]
    if s.dataflow_metrics_port:
        urls += [
            f"http://127.0.0.1:{s.dataflow_metrics_port + i}/metrics" for i in range(processes)
        ]
    return ",".join(urls)


def _redis_port(s: Settings) -> str:
    """The Redis port to show: the master's, asked of the Sentinels in HA."""
    if not s.redis_sentinels:
        return str(s.redis_port)
    first = s.redis_sentinels.split(",")[0].rpartition(":")[2]
    ask = f"sentinel get-master-addr-by-name {s.redis_sentinel_master}"
    return f"$(redis-cli -p {first} --raw {ask} | tail -1)"


_HA_LINES = """  HA stack            just stack-status   (which broker leads most partitions, which
                                           Redis is the master)
  kill a broker       just stack-kill kafka-1    then  just stack-up kafka-1
  pause a broker      just stack-kill kafka-2 --signal STOP  (CONT to resume)
  kill Redis master   just stack-kill redis      then  just stack-up redis
"""


def _redis_users(stack: Stack, base: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """The Redis credentials of the dataflow (the writer) and of the query servers (the
    reader): the stack's ACL users when its Redis has them, else none (the default user).

    Users set in the environment are left alone. A Redis started before the stack made
    its users (an older stack still running) has none, and the stack's users cover only
    its own key prefix (a job on another FLEETPULSE_REDIS_PREFIX, as the tests run it):
    said once, and the job goes on as the default user.
    """
    if base.redis_username or base.redis_api_username:
        return {}, {}
    redis_node = stack.service("redis")
    assert isinstance(redis_node, Redis)
    if not redis_node.users_path.exists():
        return {}, {}
    users = RedisUsers.kept(redis_node.users_path)
    with_users = users.settings(base)
    try:
        check(with_users, WRITER)
        check(with_users, READER)
    except ConfigError as exc:
        print(
            f"note: the stack's ACL users cannot serve this job ({exc}); the job runs as "
            "Redis' default user. A Redis started before the users existed: restart the "
            "stack (just stack-down; just stack-up) to use them.",
            flush=True,
        )
        return {}, {}
    return users.writer_env(), users.reader_env()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.local.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=10, help="simulated robots (10)")
    parser.add_argument("--rate", type=float, default=1.0, help="reports/s per robot (1)")
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument(
        "--processes", type=int, default=2, help="dataflow processes, 1 worker each (2)"
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="folder of the children's logs (<stack dir>/logs)"
    )
    parser.add_argument(
        "--ha", action="store_true", help="on the HA stack: 3 Kafka brokers, Redis Sentinel"
    )
    parser.add_argument("sim_args", nargs="*", help="more simulator options, after --")
    args = parser.parse_args(argv)
    if args.robots < 1 or args.rate <= 0 or args.processes < 1:
        parser.error("--robots and --processes must be >= 1 and --rate > 0")
    try:
        base = load_settings()
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stack = Stack(base, ha=args.ha)
    if stack.client_env():  # the product's clients then reach every node
        base = load_settings({**os.environ, **stack.client_env()})
    tokens = Tokens.new()
    if not base.dashboard_metrics:  # the pipeline panel reads every process this job runs
        base = load_settings(
            {
                **os.environ,
                **to_env(base),
                env_name("dashboard_metrics"): _metrics_urls(base, args.processes),
            }
        )
    if not base.rules_file:  # the example rules, in a copy the admin route may replace
        base = msgspec.structs.replace(base, rules_file=str(_rules_copy(base)))
    env = {**os.environ, **to_env(base), env_name("api_tokens"): tokens.setting()}
    logs = args.logs.resolve() if args.logs else REPO_ROOT / base.stack_dir / "logs"
    started_services: list[str] = []
    supervisor = Supervisor()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    py = sys.executable
    try:
        started_services = stack.up()
        logs.mkdir(parents=True, exist_ok=True)
        # A Bytewax cluster restarts whole: one supervised child runs all its processes.
        writer_env, reader_env = _redis_users(stack, base)
        flow_cmd = [py, "-m", "dataflows.cluster", "-p", str(args.processes), _FLOW]
        flow_env = {**env, **writer_env}
        supervisor.start(Child("dataflow", flow_cmd, flow_env, logs / "dataflow.log"))
        servers = (
            ("ingest", base.ingest_port),
            ("query", base.query_port),
            ("dashboard", base.dashboard_port),
        )
        for role, port in servers:
            role_env = env if role == "ingest" else {**env, **reader_env}
            server = Child(role, [py, "-m", "api.serve", role], role_env, logs / f"{role}.log")
            proc = supervisor.start(server)
            wait_http_ready(f"http://127.0.0.1:{port}/readyz", proc, 60, server.log)
        notify_cmd = [py, "-m", "dataflows.notify"]
        supervisor.start(Child("notifier", notify_cmd, env, logs / "notifier.log"))
        print(_where_to_look(base, logs, tokens, "amr-000"), flush=True)
        sim_cmd = [
            py, "-m", "sim",
            "--robots", str(args.robots),
            "--rate", str(args.rate),
            "--url", f"http://127.0.0.1:{base.ingest_port}",
            *args.sim_args,
        ]  # fmt: skip
        sim_env = {**env, env_name("sim_token"): tokens.ingest}
        supervisor.start(Child("simulator", sim_cmd, sim_env, may_finish=True))
        ends = time.monotonic() + args.duration if args.duration else None
        while not stopping and (ends is None or time.monotonic() < ends):
            supervisor.check()
            time.sleep(0.2)
        return 0
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping what this command started ...", flush=True)
        supervisor.stop_all()
        if started_services:
            stack.stop(started_services)


if __name__ == "__main__":
    sys.exit(main())
