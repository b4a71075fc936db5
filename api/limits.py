"""Rate limits of the ingest routes: token buckets per token and per robot, in reports.

A post of ``n`` reports takes ``n`` from its token's bucket and, for each robot in it,
that robot's count from the robot's bucket, all or nothing: when any bucket holds too
few, nothing is taken, nothing goes to Kafka, and the answer is 429 with ``Retry-After``
(whole seconds until the fullest-needed bucket has refilled enough) naming the limit.
Buckets refill at ``rate`` per second up to ``burst``; a rate of 0 turns a limit off.

The check runs before the producer, so a flood costs the broker nothing. Buckets live in
each server process; the settings' rates are divided by FLEETPULSE_API_WORKERS so that
one host's workers together allow about the configured rate (replicas behind a load
balancer each allow it). Robot buckets are bounded: past ``max_robots`` tracked, the
ones full again (idle long enough to have refilled) are forgotten, which changes no
answer; if every one is still draining, the oldest are forgotten (a robot forgotten
mid-burst gets a full bucket back: the limit errs towards accepting).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Literal

import msgspec

__all__ = ["Limits", "Refusal"]

Limit = Literal["token", "robot"]


class Refusal(msgspec.Struct, frozen=True):
    """Why a post was refused: which limit, how long to wait, a sentence."""

    limit: Limit
    retry_after_s: int
    detail: str


class _Bucket:
    __slots__ = ("at", "level")

    def __init__(self, level: float, at: float) -> None:
        self.level = level
        self.at = at


class _Buckets:
    """Token buckets by key, all with one rate and burst."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def level(self, key: str, now: float) -> float:
        b = self._buckets.get(key)
        if b is None:
            return self.burst
        return min(self.burst, b.level + (now - b.at) * self.rate)

    def wait_s(self, key: str, want: float, now: float) -> float | None:
        """None when ``want`` is there now; else seconds until it is (inf: never, the
        burst is smaller than what is asked)."""
        have = self.level(key, now)
        if have >= want:
            return None
        if want > self.burst:
            return math.inf
        return (want - have) / self.rate

    def take(self, key: str, n: float, now: float) -> None:
        level = self.level(key, now) - n
        b = self._buckets.get(key)
        if b is None:
            self._buckets[key] = _Bucket(level, now)
            if len(self._buckets) > self.max_keys:
                self._forget(now)
        else:
            b.level, b.at = level, now

    def _forget(self, now: float) -> None:
        full = [
            k for k, b in self._buckets.items() if b.level + (now - b.at) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        excess = len(self._buckets) - self.max_keys * 3 // 4
        if excess > 0:  # all still draining: the oldest go (dicts keep insertion order)
            for k in list(self._buckets)[:excess]:
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


class Limits:
    """The per-token and per-robot buckets of one server process."""

    def __init__(
        self,
        token_rate: float,
        token_burst: float,
        robot_rate: float,
        robot_burst: float,
        *,
        max_robots: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = _Buckets(token_rate, token_burst, max_keys=10_000) if token_rate else None
        self.robots = _Buckets(robot_rate, robot_burst, max_keys=max_robots) if robot_rate else None
        self.clock = clock

    def __bool__(self) -> bool:
        return self.tokens is not None or self.robots is not None

    def admit(self, caller: str, robot_ids: Iterable[str]) -> Refusal | None:
        """Take a post's reports from the buckets, or refuse it whole (nothing taken)."""
        if not self:
            return None
        now = self.clock()
        per_robot = Counter(robot_ids)
        # (limit, buckets, key, reports): every bucket a post draws on, checked all first.
        draws: list[tuple[Limit, _Buckets, str, int]] = []
        if self.tokens is not None:
            draws.append(("token", self.tokens, caller, sum(per_robot.values())))
        if self.robots is not None:
            draws += [("robot", self.robots, robot, n) for robot, n in per_robot.items()]
        for limit, buckets, key, n in draws:
            wait = buckets.wait_s(key, n, now)
            if wait is not None:
                who = "this token" if limit == "token" else f"robot {key!r}"
                rule = f"{who} may post {buckets.rate:g} reports/s (bursts of {buckets.burst:g})"
                return _refusal(limit, wait, n, rule)
        for _, buckets, key, n in draws:
            buckets.take(key, n, now)
        return None


def _refusal(limit: Limit, wait: float, asked: int, rule: str) -> Refusal:
    if math.isinf(wait):
        return Refusal(
            limit, 60, f"{rule}; a post of {asked} reports can never fit: send fewer at a time"
        )
    seconds = max(1, math.ceil(wait))
    return Refusal(limit, seconds, f"{rule}; retry in {seconds} s")
