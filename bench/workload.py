"""The shape of a real fleet's traffic, for the drain benchmarks and the profile.

    Shape(robots=10_000, reports=220_000, hot=0.01, hot_share=0.5, disorder=0.2,
          duplicates=0.1, sampled=1.0)

Many robots, each reporting about once a second on its own clock, a few hot robots
sending far more (``hot`` of the robots send ``hot_share`` of the reports), reports
delivered locally out of order (``disorder``: a report arrives after the robot's next
one) and redelivered (``duplicates``), and a ``traceparent`` on each report whose
sampled flag is set for ``sampled`` of them (as ingest sets it at that trace ratio).
Deterministic for a seed. Every engine reads the same topic, so all are measured on
the same bytes.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec

from deploy.local.harness import Headers, produce
from fleetpulse.settings import Settings
from state.keys import Keys

__all__ = ["Shape", "fill", "final_count", "final_orders", "messages"]


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """A workload: how many robots, how many reports, and how untidy."""

    robots: int = 10_000
    reports: int = 220_000
    hot: float = 0.01  # share of the robots that are hot
    hot_share: float = 0.5  # share of the reports the hot robots send
    disorder: float = 0.2  # reports delivered after the robot's next one
    duplicates: float = 0.1  # reports delivered twice
    sampled: float = 1.0  # reports whose traceparent says "sampled"
    seed: int = 7

    def describe(self) -> str:
        hot = (
            f"{self.hot:.0%} of the robots send {self.hot_share:.0%}"
            if self.hot > 0
            else "all at the same rate"
        )
        return (
            f"{self.robots:,} robots, {self.reports:,} reports, {hot}, "
            f"{self.disorder:.0%} out of order, "
            f"{self.duplicates:.0%} redelivered, {self.sampled:g} traced"
        )

    def counts(self) -> list[int]:
        """Reports per robot (before duplicates): the hot ones first."""
        hot = max(1, round(self.robots * self.hot)) if self.hot > 0 else 0
        cold = self.robots - hot
        unique = round(self.reports / (1 + self.duplicates))
        hot_total = round(unique * self.hot_share) if hot else 0
        out = [hot_total // hot + (1 if i < hot_total % hot else 0) for i in range(hot)]
        rest = unique - hot_total
        out += [max(1, rest // cold + (1 if i < rest % cold else 0)) for i in range(cold)]
        return out


def robot_id(i: int) -> str:
    return f"amr-{i:06d}"


def _report(robot: str, seq: int, ts: float) -> bytes:
    return msgspec.json.encode(
        {
            "robot_id": robot,
            "boot": 0,
            "seq": seq,
            "ts": datetime.fromtimestamp(ts, UTC).isoformat(),
            "status": "moving" if seq % 50 else "working",
            "battery": 100.0 - (seq % 400) * 0.2,
            "pose": {"x": (seq % 1000) * 0.4, "y": (seq % 7) * 0.1, "theta": 0.0},
            "speed": 0.4,
            "errors": [],
            "site": f"site-{zlib.crc32(robot.encode()) % 4}",
        }
    )


def _traceparent(rng: random.Random, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (
        rng.getrandbits(128) or 1,
        rng.getrandbits(64) or 1,
        b"01" if sampled else b"00",
    )


def messages(shape: Shape) -> Iterator[tuple[bytes, bytes, Headers]]:
    """(key, value, headers) in delivery order: robots interleaved by their own clock."""
    rng = random.Random(shape.seed)
    counts = shape.counts()
    # The fleet's time: the ordinary robots report once a second, so the run covers as many
    # seconds as they send reports; the hot ones send theirs faster over the same seconds.
    span = float(counts[-1])
    timeline: list[tuple[float, int, int]] = []
    for i, n in enumerate(counts):
        step = span / n
        start = rng.uniform(0, step)
        timeline += [(start + j * step, i, j) for j in range(n)]
    timeline.sort()
    # Event time ends a minute before now, so that however many seconds the run covers,
    # no report is further ahead of its arrival than FLEETPULSE_MAX_FUTURE_S (nor
    # further behind than FLEETPULSE_MAX_AGE_S, for spans under a week).
    origin = int(time.time()) - int(span) - 60
    held: dict[int, tuple[float, int, int]] = {}  # a report waiting to arrive after the next
    for t, i, j in timeline:
        out = []
        if i in held:
            out.append((t, i, j))
            out.append(held.pop(i))
        elif j + 1 < counts[i] and rng.random() < shape.disorder:
            held[i] = (t, i, j)
        else:
            out.append((t, i, j))
        for t_, i_, j_ in out:
            robot = robot_id(i_)
            value = _report(robot, j_, origin + t_)
            headers: Headers = [("traceparent", _traceparent(rng, rng.random() < shape.sampled))]
            yield robot.encode(), value, headers
            if rng.random() < shape.duplicates:
                yield robot.encode(), value, headers
    for t_, i_, j_ in held.values():
        robot = robot_id(i_)
        yield robot.encode(), _report(robot, j_, origin + t_), []


def final_orders(shape: Shape) -> dict[str, int]:
    """Each robot's newest seq: what its live state shows once everything is read."""
    return {robot_id(i): n - 1 for i, n in enumerate(shape.counts())}


def fill(settings: Settings, shape: Shape) -> int:
    """Produce the shape's messages to the reports topic; returns how many."""
    return produce(settings, messages(shape))


def final_count(client: Any, keys: Keys, want: dict[str, int]) -> int:
    """How many robots of ``want`` show their newest seq in Redis (one pipelined read)."""
    robots = list(want)
    done = 0
    for i in range(0, len(robots), 5000):
        pipe = client.pipeline(transaction=False)
        for rid in robots[i : i + 5000]:
            pipe.hget(keys.robot(rid), "seq")
        for rid, seq in zip(robots[i : i + 5000], pipe.execute(), strict=True):
            done += seq is not None and int(seq) == want[rid]
    return done
