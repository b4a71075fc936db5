"""``python -m sim``: options, the live progress line, the final summary and the exit code.

    python -m sim --robots 10 --rate 1 --duration 60 --token <ingest token>

Progress goes to stderr (one refreshing line on a terminal, a line every few seconds
otherwise); the final summary goes to stderr for people and to stdout as one short JSON
line for scripts, whatever the fleet's size; ``--detail`` adds each robot's last
``(boot, seq)`` and counts and every silence and reboot to it. Exit status: 0 for a
clean run, 1 when reports were not accepted (nothing reachable, rejections, or
reports left unanswered), 2 for bad arguments or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from fleetpulse.errors import ConfigError
from fleetpulse.schema import is_robot_id
from fleetpulse.settings import Settings, load_settings
from sim.client import DriveResult, Poster, Sender, Tally, drive
from sim.fleet import Fleet, FleetConfig, RebootSpec, SilenceSpec, robot_ids

__all__ = ["SIM_TOKEN_ENV", "Options", "main", "parse_args", "run"]

SIM_TOKEN_ENV = "FLEETPULSE_SIM_TOKEN"


@dataclass(frozen=True, slots=True)
class Options:
    """A validated command line."""

    fleet: FleetConfig
    url: str
    token: str
    duration_s: float | None
    count: int | None
    batch: int | None
    batch_window_s: float
    concurrency: int
    grace_s: float
    progress_s: float | None  # None: the default for the kind of stderr
    detail: bool = False  # per-robot figures, silences and reboots in the summary


# --- argument types: each error names its option through argparse -----------------------


def _number(text: str, *, integer: bool) -> float:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if integer else 'a number'}"
        ) from None


def _at_least(low: float, *, integer: bool = False, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a number >= ``low`` (> with ``strict``), an int with ``integer``."""

    def convert(text: str) -> float:
        value = _number(text, integer=integer)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"{text} is not allowed; it must be {'>' if strict else '>='} {low:g}"
            )
        return value

    return convert


def _probability(text: str) -> float:
    value = _number(text, integer=False)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1")
    return value


def _site(text: str) -> str:
    if not is_robot_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a site name (letters, digits and _ . : -, at most 64)"
        )
    return text


def _silence(text: str) -> SilenceSpec:
    # rsplit: robot ids may themselves contain ':'.
    parts = text.rsplit(":", 2)
    usage = f"{text!r} is not ROBOT:START_S:DURATION_S (e.g. amr-003:10:5)"
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(usage)
    try:
        start, duration = float(parts[1]), float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if not (start >= 0 and duration > 0) or float("inf") in (start, duration):
        raise argparse.ArgumentTypeError(
            f"{text!r}: START_S must be >= 0 and DURATION_S > 0 (seconds, finite)"
        )
    return SilenceSpec(parts[0], start, duration)


def _reboot(text: str) -> RebootSpec:
    robot, _, at = text.rpartition(":")
    usage = f"{text!r} is not ROBOT:AT_S (e.g. amr-001:30)"
    try:
        at_s = float(at)
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if not robot or not 0 <= at_s < float("inf"):
        raise argparse.ArgumentTypeError(usage)
    return RebootSpec(robot, at_s)


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """The argument parser; defaults that depend on settings come from ``settings``."""
    p = argparse.ArgumentParser(
        prog="python -m sim",
        description="Robot fleet simulator: robots that move, work, charge, fail and go "
        "silent, posting their reports to the fleetpulse ingest API.",
    )
    pos, nonneg = _at_least(0, strict=True), _at_least(0)
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--robots", type=_at_least(1, integer=True), default=10, help="robots (10)")
    fleet.add_argument("--rate", type=pos, default=1.0, help="reports/s per robot (1)")
    fleet.add_argument(
        "--site",
        type=_site,
        action="append",
        default=[],
        help="site name; repeat to spread robots over several sites",
    )
    fleet.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")
    events = p.add_argument_group("events (probabilities per robot-second unless noted)")
    events.add_argument(
        "--fault-prob",
        type=_probability,
        default=0.002,
        help="fault: status error with error codes, recovers after 3-15 s (0.002)",
    )
    events.add_argument(
        "--estop-prob",
        type=_probability,
        default=0.001,
        help="e-stop: status estop for 5-20 s (0.001)",
    )
    events.add_argument(
        "--reboot-prob",
        type=_probability,
        default=0.0005,
        help="reboot: off 1-3 s, then boot + 1 and seq from 0 (0.0005)",
    )
    events.add_argument(
        "--silence-prob",
        type=_probability,
        default=0.0,
        help="going silent for 3-20 s (reports suppressed, robot keeps living) (0.0)",
    )
    events.add_argument(
        "--silence",
        type=_silence,
        action="append",
        default=[],
        metavar="ROBOT:START_S:DURATION_S",
        help="robot sends nothing from START_S for DURATION_S (repeatable)",
    )
    events.add_argument(
        "--reboot",
        type=_reboot,
        action="append",
        default=[],
        metavar="ROBOT:AT_S",
        help="robot reboots at AT_S (repeatable)",
    )
    events.add_argument(
        "--shuffle-prob",
        type=_probability,
        default=0.0,
        help="per report: delivered after the robot's next one",
    )
    events.add_argument(
        "--duplicate-prob", type=_probability, default=0.0, help="per report: delivered twice"
    )
    events.add_argument(
        "--clock-skew-s",
        type=nonneg,
        default=0.0,
        help="largest clock error of a robot, either way (0)",
    )
    post = p.add_argument_group("posting")
    post.add_argument(
        "--url",
        default=f"http://127.0.0.1:{settings.ingest_port}",
        help="ingest API base URL (http://127.0.0.1:FLEETPULSE_INGEST_PORT)",
    )
    post.add_argument(
        "--token", default=None, help=f"bearer token with ingest scope (default: ${SIM_TOKEN_ENV})"
    )
    post.add_argument(
        "--batch",
        type=_at_least(1, integer=True),
        default=None,
        metavar="N",
        help="post batches of up to N reports to /v1/reports/batch",
    )
    post.add_argument(
        "--batch-window-s", type=pos, default=0.2, help="longest a batch stays open (0.2)"
    )
    post.add_argument(
        "--concurrency",
        type=_at_least(1, integer=True),
        default=16,
        help="requests in flight at most (16)",
    )
    run = p.add_argument_group("run")
    run.add_argument("--duration", type=pos, default=None, help="stop after this many seconds")
    run.add_argument(
        "--count",
        type=_at_least(1, integer=True),
        default=None,
        help="stop after posting this many reports",
    )
    run.add_argument(
        "--grace-s",
        type=nonneg,
        default=10.0,
        help="at the end, how long to wait for in-flight answers (10)",
    )
    run.add_argument(
        "--progress-s",
        type=pos,
        default=None,
        help="seconds between progress lines (0.5 on a terminal, else 5)",
    )
    run.add_argument(
        "--detail",
        action="store_true",
        help="put each robot's figures and every silence and reboot in the JSON summary",
    )
    return p


def parse_args(argv: Sequence[str], settings: Settings) -> Options:
    """Validate the command line; exits with status 2 and a message naming the option."""
    parser = build_parser(settings)
    a = parser.parse_args(argv)
    ids = robot_ids(a.robots)
    known = set(ids)
    for option, specs in (("--silence", a.silence), ("--reboot", a.reboot)):
        for spec in specs:
            if spec.robot_id not in known:
                parser.error(
                    f"argument {option}: robot {spec.robot_id!r} is not in the fleet "
                    f"({ids[0]}..{ids[-1]}; see --robots)"
                )
    if not re.match(r"^https?://[^/\s]+", a.url):
        parser.error(f"argument --url: {a.url!r} is not an http:// or https:// URL")
    token = a.token or settings.sim_token
    if not token.strip():
        parser.error(
            f"argument --token: no token; pass --token or set {SIM_TOKEN_ENV} "
            "(`just token ingest` makes one and prints the setting for the server)"
        )
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big")
    fleet = FleetConfig(
        robots=a.robots,
        rate=a.rate,
        sites=tuple(a.site),
        seed=seed,
        silences=tuple(a.silence),
        reboots=tuple(a.reboot),
        silence_prob=a.silence_prob,
        fault_prob=a.fault_prob,
        estop_prob=a.estop_prob,
        reboot_prob=a.reboot_prob,
        shuffle_prob=a.shuffle_prob,
        duplicate_prob=a.duplicate_prob,
        clock_skew_s=a.clock_skew_s,
    )
    return Options(
        fleet=fleet,
        url=a.url,
        token=token.strip(),
        duration_s=a.duration,
        count=a.count,
        batch=a.batch,
        batch_window_s=a.batch_window_s,
        concurrency=a.concurrency,
        grace_s=a.grace_s,
        progress_s=a.progress_s,
        detail=a.detail,
    )


class Progress:
    """The live line: elapsed, sent, accepted, rejected, retried and the recent rate."""

    def __init__(self, tally: Tally, out: TextIO, every_s: float | None) -> None:
        self.tally = tally
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s or (0.5 if self.tty else 5.0)
        self._samples: deque[tuple[float, int]] = deque()
        self._start = time.monotonic()

    def line(self) -> str:
        """The progress text as of now."""
        t, now = self.tally, time.monotonic()
        self._samples.append((now, t.accepted))
        # The rate over the last ~5 s: recent enough to show a stall, smooth enough to read.
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        t0, a0 = self._samples[0]
        rate = (t.accepted - a0) / (now - t0) if now > t0 else 0.0
        text = (
            f"sim {now - self._start:6.1f}s  sent {t.sent}  accepted {t.accepted}  "
            f"rejected {sum(t.rejected.values())}  retried {t.retried}  {rate:.1f} reports/s"
        )
        if t.last_problem and (t.retried or t.rejected):
            text += f"  [{t.last_problem}]"
        return text

    def show(self) -> None:
        """Write the line: in place on a terminal, as a new line elsewhere."""
        if self.tty:
            self.out.write("\r" + self.line() + "\x1b[K")
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    async def run(self) -> None:
        """Show the line every ``every_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.every_s)
            self.show()

    def end(self) -> None:
        """Leave the terminal line so the summary starts on a fresh one."""
        if self.tty:
            self.out.write("\r" + self.line() + "\x1b[K\n")
            self.out.flush()


def _verdict(tally: Tally, url: str) -> str | None:
    """None for a clean run, else what went wrong, in words."""
    rejected = sum(tally.rejected.values())
    if tally.sent == 0:
        return "nothing was generated to send (run longer or raise --rate)"
    if tally.answered == 0:
        return (
            f"nothing could be sent: {url} never answered ({tally.last_problem or 'no answer'}; "
            f"{tally.requests} attempts). Is the ingest server running (`just serve-ingest`)?"
        )
    if tally.accepted == 0 and rejected:
        codes = ", ".join(f"{c} x{n}" for c, n in tally.rejected.items())
        return f"every report was rejected ({codes}); last: {tally.last_problem}"
    if rejected:
        return f"{rejected} reports were rejected ({dict(tally.rejected)})"
    if tally.unsent:
        return f"{tally.unsent} reports were left unanswered when the run ended"
    return None


def summary(
    opts: Options, fleet: Fleet, tally: Tally, result: DriveResult, wall_s: float
) -> dict[str, Any]:
    """Everything a script needs to check a run, as plain JSON-able values.

    ``duration_s`` is the whole run, the wait for the last answers included; ``rate`` is
    accepted reports per second of it.
    """
    problem = _verdict(tally, opts.url)
    silences = fleet.silences(result.elapsed_s)
    out: dict[str, Any] = {
        "ok": problem is None,
        "problem": problem,
        "seed": opts.fleet.seed,
        "url": opts.url,
        "robots": opts.fleet.robots,
        "batch": opts.batch,
        "stopped_by": "signal" if result.reason == "stopped" else result.reason,
        "duration_s": round(wall_s, 3),
        "sent": tally.sent,
        "accepted": tally.accepted,
        "rejected": dict(tally.rejected),
        "retried": tally.retried,
        "retry_causes": dict(tally.retry_causes),
        "unsent": tally.unsent,
        "held_back": result.held_back,
        "max_lag_s": round(result.max_lag_s, 3),
        "requests": tally.requests,
        "rate": round(tally.accepted / wall_s, 1) if wall_s > 0 else 0.0,
        "shuffled": fleet.shuffled,
        "duplicated": fleet.duplicated,
        "silence_count": len(silences),
        "reboot_count": len(fleet.reboots),
    }
    if not opts.detail:
        return out  # one short line, whatever the fleet's size
    per_robot = {}
    for rid in fleet.ids:
        r = tally.robots.get(rid)
        last = r.last if r else None
        per_robot[rid] = {
            "boot": last[0] if last else None,
            "seq": last[1] if last else None,
            "sent": r.sent if r else 0,
            "accepted": r.accepted if r else 0,
        }
    out["per_robot"] = per_robot
    out["silences"] = [
        {
            "robot_id": s.robot_id,
            "start_s": round(s.start_s, 3),
            "end_s": round(s.end_s, 3),
            "start_ts": s.start_ts,
            "end_ts": s.end_ts,
        }
        for s in silences
    ]
    out["reboots"] = [
        {"robot_id": r.robot_id, "at_s": round(r.at_s, 3), "boot": r.boot} for r in fleet.reboots
    ]
    return out


async def run(opts: Options, err: TextIO) -> dict[str, Any]:
    """Run the simulator until its limit or a signal; return the summary."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        # First Ctrl-C: stop generating, finish what is in flight. Second: stop now.
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    progress = Progress(tally, err, opts.progress_s)
    ticker = asyncio.create_task(progress.run())
    poster = Poster(opts.url, opts.token, tally, concurrency=opts.concurrency)
    sender = Sender(
        poster, workers=opts.concurrency, batch=opts.batch, window_s=opts.batch_window_s
    )
    fleet = Fleet(opts.fleet, datetime.now(UTC))
    started = time.monotonic()
    try:
        result = await drive(fleet, sender, stop, duration_s=opts.duration_s, count=opts.count)
        await sender.drain(opts.grace_s, force)
    finally:
        ticker.cancel()
        await poster.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    progress.end()
    return summary(opts, fleet, tally, result, time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sim``; returns the exit status."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sim: error: {exc}", file=sys.stderr)
        return 2
    opts = parse_args(sys.argv[1:] if argv is None else argv, settings)
    mode = f"batches of up to {opts.batch}" if opts.batch else "single posts"
    print(
        f"sim: {opts.fleet.robots} robots x {opts.fleet.rate:g}/s -> {opts.url} ({mode}), "
        f"seed {opts.fleet.seed}",
        file=sys.stderr,
    )
    result = asyncio.run(run(opts, sys.stderr))
    rejected = sum(result["rejected"].values())
    print(
        f"sim: stopped by {result['stopped_by']} after {result['duration_s']:.1f}s: "
        f"sent {result['sent']}, accepted {result['accepted']}, rejected {rejected}, "
        f"retried {result['retried']}, unsent {result['unsent']}; {result['rate']} reports/s",
        file=sys.stderr,
    )
    if result["max_lag_s"] > 1.0 or result["held_back"]:
        print(
            f"sim: note: the server did not keep up: reports went out up to "
            f"{result['max_lag_s']:.1f}s late; {result['held_back']} were never posted",
            file=sys.stderr,
        )
    if result["problem"]:
        print(f"sim: error: {result['problem']}", file=sys.stderr)
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1
