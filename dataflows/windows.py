"""Event-time tumbling windows of one robot, closed by that robot's watermark.

Windows are ``[start, start + window_s)`` aligned to the UNIX epoch and keyed by
``start`` (integer UNIX seconds). A window keeps one :data:`Point` per ``(boot, seq)``
sorted in that order, so duplicates count once and the distance follows the robot's
own order whatever order the reports arrived in; every statistic is computed when the
window closes, from the sorted points, so the result does not depend on arrival order
(not even in the last bit of a float sum).

The watermark is Bytewax's ``EventClock`` (0.21, ``_EventClockLogic``) restated over
floats: ``watermark = offset + clock`` where ``clock`` is the newest processing time
seen (it never goes backwards) and ``offset`` is the largest
``event_time - allowed_lateness - processing_time`` seen so far. That is Bytewax's
``watermark_base + (now - system_time_of_max_event)``, updated in the same case
(only when a report would move the watermark forward), so it never regresses.
A window closes once ``watermark >= end``; a report whose window end is at or below
the watermark (or whose window already closed) is late.

One deliberate difference: :meth:`Windows.rebase` (called after a restore from a
snapshot) keeps the watermark where it was instead of letting the downtime advance
it, so the reports Kafka replays after a restart land in their windows, not in "late".
"""

from __future__ import annotations

import math
from bisect import bisect_left
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import msgspec

from dataflows.rules import Rules
from fleetpulse.schema import RobotReport, WindowStats

__all__ = ["Point", "Windows", "window_start"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# (boot, seq, battery, x, y, speed, error_count): one report reduced to what the stats
# need. A plain tuple sorts by (boot, seq) first and pickles small.
Point = tuple[int, int, float, float, float, float, int]


def window_start(ts: datetime, window_s: int) -> int:
    """Start (UNIX seconds) of the epoch-aligned ``window_s`` window that holds ``ts``."""
    # Exact datetime arithmetic: a float division could move a report that sits exactly
    # on a boundary into the previous window.
    return (ts - _EPOCH) // timedelta(seconds=window_s) * window_s


def _order(point: Point) -> tuple[int, int]:
    return (point[0], point[1])


def _stats(robot_id: str, start: int, window_s: int, points: list[Point]) -> WindowStats:
    batteries = [p[2] for p in points]
    return WindowStats(
        robot_id=robot_id,
        window_start=datetime.fromtimestamp(start, UTC),
        window_end=datetime.fromtimestamp(start + window_s, UTC),
        count=len(points),
        battery_min=min(batteries),
        # fsum is exactly rounded, so the mean is the same for any order of the values.
        battery_avg=math.fsum(batteries) / len(points),
        battery_max=max(batteries),
        distance_m=math.fsum(math.hypot(b[3] - a[3], b[4] - a[4]) for a, b in pairwise(points)),
        max_speed=max(p[5] for p in points),
        error_count=sum(p[6] for p in points),
    )


class Windows(msgspec.Struct, kw_only=True, gc=False):
    """Open windows of one robot plus its watermark bookkeeping (pickles cleanly)."""

    open: dict[int, list[Point]] = msgspec.field(default_factory=dict)
    offset: float = -math.inf  # watermark minus clock; -inf until the first report
    clock: float = -math.inf  # newest processing time seen
    # End of the newest window already closed: reports for it or anything before are
    # late even if float rounding or a flush left the watermark itself below that end.
    closed_end: float = -math.inf
    close_at: float | None = None  # processing time the earliest open window closes

    def watermark(self) -> float:
        """Event time (UNIX seconds) up to which every window is complete."""
        return max(self.offset + self.clock, self.closed_end)

    def _advance(self, now: float) -> None:
        # Like Bytewax: a clock that steps back (NTP) holds the watermark, never rewinds it.
        if now > self.clock:
            self.clock = now

    def add(self, report: RobotReport, now: float, rules: Rules) -> bool:
        """Count ``report`` in its window; False (and nothing added) if it is late.

        A report whose ``(boot, seq)`` the window already holds is ignored (first wins).
        Call :meth:`close_due` afterwards: the report may have moved the watermark.
        """
        self._advance(now)
        base = report.ts.timestamp() - rules.allowed_lateness_s - self.clock
        if base > self.offset:
            self.offset = base
        start = window_start(report.ts, rules.window_s)
        if start + rules.window_s <= self.watermark():
            return False
        points = self.open.get(start)
        if points is None:
            points = self.open[start] = []
        key = (report.boot, report.seq)
        point: Point = (
            report.boot,
            report.seq,
            report.battery,
            report.pose.x,
            report.pose.y,
            report.speed,
            len(report.errors),
        )
        if not points or _order(points[-1]) < key:
            points.append(point)  # the usual case: reports arrive in order
        else:
            i = bisect_left(points, key, key=_order)
            if i == len(points) or _order(points[i]) != key:
                points.insert(i, point)
        self._schedule(rules)
        return True

    def close_due(self, robot_id: str, now: float, rules: Rules) -> list[WindowStats]:
        """Close (and return, oldest first) every window the watermark at ``now`` passed."""
        self._advance(now)
        if self.close_at is None or self.close_at > self.clock:
            return []
        watermark = self.watermark()
        due = sorted(
            start
            for start in self.open
            # The second test is how close_at was computed: a wakeup at exactly close_at
            # must close the window even if offset + clock rounds a hair below its end
            # (otherwise the caller would be woken at the same time forever).
            if start + rules.window_s <= watermark
            or start + rules.window_s - self.offset <= self.clock
        )
        return self._close(robot_id, due, rules)

    def flush(self, robot_id: str, rules: Rules) -> list[WindowStats]:
        """Close and return every open window, oldest first (end of stream, tests)."""
        return self._close(robot_id, sorted(self.open), rules)

    def rebase(self, now: float, rules: Rules) -> None:
        """Resume after a restore at processing time ``now`` with the watermark unchanged.

        The downtime is not counted as elapsed processing time: the reports Kafka
        replays from the snapshot's offsets must fall into their windows, not be late.
        """
        if math.isfinite(self.clock):
            self.offset += self.clock - now
        self.clock = now
        self._schedule(rules)

    def _close(self, robot_id: str, starts: list[int], rules: Rules) -> list[WindowStats]:
        closed = [_stats(robot_id, s, rules.window_s, self.open.pop(s)) for s in starts]
        if starts:
            self.closed_end = max(self.closed_end, starts[-1] + rules.window_s)
        self._schedule(rules)
        return closed

    def _schedule(self, rules: Rules) -> None:
        # offset is finite whenever a window is open (the report that opened it set it).
        self.close_at = min(self.open) + rules.window_s - self.offset if self.open else None
