"""Process plumbing for the local stack: pid files, ports, log tails, progress lines.

A service started by the stack is recorded in ``<stack>/run/<name>.pid`` as its pid
*and* its kernel start time, so that a later ``stack-down`` only ever signals the
very process the stack started, never one that reused the pid, and never by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import msgspec

from fleetpulse.errors import StackError

__all__ = [
    "PidFile",
    "free_port",
    "last_error_line",
    "log_tail",
    "port_in_use",
    "run_with_progress",
    "spawn",
    "wait_http_ready",
]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/pid/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # exited, not yet reaped: not running
        return None
    return fields[19]


class PidFile:
    """The pid file of one service: which process the stack started, if it still runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, pid: int) -> None:
        started = _start_time(pid)
        if started is None:
            raise StackError(f"process {pid} exited before it could be recorded")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid} {started}\n")

    def running_pid(self) -> int | None:
        """The recorded pid if that very process is still alive, else None."""
        try:
            pid_text, started = self.path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        _reap(pid)
        return pid if _start_time(pid) == started else None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the recorded process (SIGKILL after ``timeout_s``); returns its pid."""
        pid = self.running_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                # The stack starts each service in a session of its own: end the whole group.
                if _is_group_leader(pid):
                    os.killpg(pid, signal.SIGTERM)
                else:
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.running_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running_pid() is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while self.running_pid() is not None:
                    time.sleep(0.05)
        self.path.unlink(missing_ok=True)
        return pid


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _reap(pid: int) -> None:
    """Collect an exited child of ours so that it stops looking alive."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# Services outlive the Popen objects that started them; holding the objects keeps Python
# from warning that a child "is still running" when they are collected.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def spawn(cmd: Sequence[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
    """Start ``cmd`` detached in its own session, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN.append(proc)
    return proc.pid


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        with path.open("r", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return f"(no log at {path})\n"


_ERROR_LEVELS = {"ERROR", "CRITICAL", "FATAL"}
# Plain lines that report a failure (JSON log lines are judged by their level).
_ERROR_TEXT = re.compile(
    r"^\[(ERROR|CRITICAL|FATAL)\]"  # granian
    r"|^thread '.*' panicked"  # Rust: Bytewax's runtime
    r"|^[A-Za-z_][\w.]*(Error|Exception)\b"  # a Python exception line outside a traceback
    r"|^(?i:error|fatal)\b"  # an entry point's "error: ..."
)


def last_error_line(text: str) -> str | None:
    """The newest line of a log that reports an error, or None.

    A JSON log line counts by its ``level`` (shown as ``LEVEL logger: msg``); a traceback
    by the exception line that ends it (``KeyboardInterrupt`` too: the process was told
    to stop); other lines by how they start (granian's ``[ERROR]``, a Rust panic).
    """
    found: str | None = None
    in_traceback = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("{"):
            in_traceback = False
            try:
                doc = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(doc, dict) and str(doc.get("level", "")).upper() in _ERROR_LEVELS:
                found = f"{doc['level']} {doc.get('logger', '?')}: {doc.get('msg', '')}"
                if doc.get("exc"):
                    found += f" ({str(doc['exc']).strip().splitlines()[-1]})"
        elif line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            found, in_traceback = line, False  # the exception that ends the traceback
        elif _ERROR_TEXT.match(line):
            found = line
    return found


def run_with_progress(
    cmd: Sequence[str], label: str, log_path: Path, cwd: Path, env: dict[str, str] | None = None
) -> None:
    """Run a provisioning command, showing one live progress line; the full output goes to a log.

    Raises StackError with the log's tail if the command fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tty = sys.stderr.isatty()
    steps = 0
    last_note = 0.0
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            steps += 1
            now = time.monotonic()
            if tty:
                text = line.strip()[:60]
                sys.stderr.write(f"\r  {label}: {steps} steps, {now - started:4.0f}s  {text:<60}")
                sys.stderr.flush()
            elif now - last_note >= 10:
                sys.stderr.write(f"  {label}: {steps} steps, {now - started:.0f}s\n")
                last_note = now
        code = proc.wait()
    if tty:
        sys.stderr.write("\r" + " " * 110 + "\r")
    if code != 0:
        raise StackError(
            f"{label} failed (exit {code}); last lines of {log_path}:\n{log_tail(log_path)}"
        )
    sys.stderr.write(f"  {label}: done in {time.monotonic() - started:.0f}s\n")


def wait_http_ready(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200; a process that exits or stays unready is a
    StackError carrying its output (``log``'s tail, or its piped stdout)."""
    import httpx  # only the callers that start servers pay for it

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            if not exited:
                proc.kill()
                proc.wait(10)
            if log is not None:
                out = log_tail(log)
            else:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            what = f"exited with {proc.returncode}" if exited else f"not ready in {timeout_s:g}s"
            raise StackError(f"{url}: the server {what}\n{out}")
        time.sleep(0.2)


def free_port(span: int = 1) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now; with ``span`` > 1, the
    first of that many free ports in a row (a dataflow cluster's processes serve their
    metrics on the port + their index)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if all(_bindable(port + i) for i in range(1, span)):
            return port
    raise StackError(f"no {span} free ports in a row on 127.0.0.1")


def _bindable(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
