"""Event-time tumbling windows of one robot, closed by that robot's watermark.

Windows are ``[start, start + window_s)`` aligned to the UNIX epoch and keyed by
``start`` (integer UNIX seconds). A window keeps one :data:`Point` per ``(boot, seq)``
sorted in that order, so duplicates count once and the distance follows the robot's
own order whatever order the reports arrived in; every statistic is computed when the
window closes, from the sorted points, so the result does not depend on arrival order
(not even in the last bit of a float sum).

The watermark is Bytewax's ``EventClock`` restated on the *arrival* clock (Kafka append
time) instead of the flow's own: ``watermark = offset + arrival`` where ``offset`` is the
largest ``ts - allowed_lateness - arrival`` seen. A report is late when its window's end
is at or below the watermark at its own arrival; a window closes once the source's
progress on the arrival clock (every message appended up to then has been read) passes
``end - offset``. Both are functions of the Kafka log alone, so a replay after a crash,
a stalled flow or a slow one decides exactly the same lateness and window contents as
an uninterrupted run: a report that arrives after its window closed has an arrival at
or past the close point, so it is late by the same rule.

Clock trouble (the watermark never goes back by itself): a report far ahead of its
arrival is refused before it gets here (``fleetpulse.schema.time_bounds_problem``), so
one report can move the watermark at most ``max_future_s`` ahead. A robot whose clock
went *back* (NTP step, RTC reset, a clock that had run ahead) would otherwise be late
forever; once its reports have been late without a break for ``window_s +
allowed_lateness_s`` of arrival time, :meth:`Windows.rebase` closes what is open and
restarts the watermark from the robot's new clock. A minute that was already closed
before (in an earlier clock generation) is then written as a separate ``part`` beside
the first one, never over it.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import msgspec

from dataflows.rules import Rules
from fleetpulse.schema import RobotReport, WindowStats

__all__ = ["Point", "Windows", "window_fits", "window_start"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# The whole seconds a window bound can take as a datetime (0001-01-01 to 9999-12-31 UTC).
_FIRST_S = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(seconds=1)
_LAST_S = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(seconds=1)

# (boot, seq, battery, x, y, speed, error_count): one report reduced to what the stats
# need. A plain tuple sorts by (boot, seq) first and pickles small.
Point = tuple[int, int, float, float, float, float, int]


def window_start(ts: datetime, window_s: int) -> int:
    """Start (UNIX seconds) of the epoch-aligned ``window_s`` window that holds ``ts``."""
    # Exact integer arithmetic: a float division could move a report that sits exactly
    # on a boundary into the previous window (and timedelta(seconds=window_s) overflows
    # for a window of millions of years, which window_fits must be able to refuse).
    return (ts - _EPOCH) // _US // (window_s * 1_000_000) * window_s


def window_fits(ts: datetime, window_s: int) -> bool:
    """Whether the window that holds ``ts`` starts and ends within years 1-9999 (UTC).

    The schema takes any year 1-9999 with any offset, so a ts in the last window of
    year 9999 (or written ``9999-12-31T23:59-05:00``, in year 10000 UTC) has a window
    that :class:`~fleetpulse.schema.WindowStats` cannot carry; such a report is refused
    before it reaches a robot's state (``dataflows.classify``).
    """
    start = window_start(ts, window_s)
    return start >= _FIRST_S and start + window_s <= _LAST_S


def _order(point: Point) -> tuple[int, int]:
    return (point[0], point[1])


def _stats(robot_id: str, start: int, part: int, window_s: int, points: list[Point]) -> WindowStats:
    batteries = [p[2] for p in points]
    return WindowStats(
        robot_id=robot_id,
        window_start=_EPOCH + timedelta(seconds=start),
        window_end=_EPOCH + timedelta(seconds=start + window_s),
        count=len(points),
        battery_min=min(batteries),
        # fsum is exactly rounded, so the mean is the same for any order of the values.
        battery_avg=math.fsum(batteries) / len(points),
        battery_max=max(batteries),
        distance_m=math.fsum(math.hypot(b[3] - a[3], b[4] - a[4]) for a, b in pairwise(points)),
        max_speed=max(p[5] for p in points),
        error_count=sum(p[6] for p in points),
        part=part,
    )


class Windows(msgspec.Struct, kw_only=True, gc=False):
    """Open windows of one robot and its event clock (part of the snapshotted state).

    Open-window lists are never changed in place: :meth:`add` replaces a window's list,
    so a shallow copy of this Struct and of ``open`` is an independent copy (the robot
    logic copies before each step, so a step that fails leaves the state as it was).
    """

    open: dict[int, list[Point]] = msgspec.field(default_factory=dict)
    offset: float = -math.inf  # watermark minus arrival; -inf until the first report
    # End of the newest window closed in this clock generation: reports for it or
    # anything before are late even if float rounding left the watermark below it.
    closed_end: float = -math.inf
    high: float = -math.inf  # newest window end closed in any earlier generation
    part: int = 0  # clock generations so far (times the robot's clock went back)
    late_since: float | None = None  # arrival of the first report of a run of late ones

    def watermark(self, arrival: float) -> float:
        """Event time (UNIX seconds) up to which every window is complete at ``arrival``."""
        return max(self.offset + arrival, self.closed_end)

    def close_at(self, rules: Rules) -> float | None:
        """Arrival time at which the earliest open window closes (None: nothing open)."""
        return min(self.open) + rules.window_s - self.offset if self.open else None

    def add(self, report: RobotReport, arrival: float, rules: Rules) -> bool:
        """Count ``report`` in its window; False (and nothing added) if it is late.

        A report whose ``(boot, seq)`` the window already holds is ignored (first wins).
        """
        base = report.ts.timestamp() - rules.allowed_lateness_s - arrival
        if base > self.offset:
            self.offset = base
        start = window_start(report.ts, rules.window_s)
        end = start + rules.window_s
        # end <= watermark(arrival), written as close_due writes it: a report arriving at
        # its window's close point is late whether or not progress closed the window first
        # (end <= offset + arrival can round the other way than end - offset <= arrival).
        if end <= self.closed_end or end - self.offset <= arrival:
            if self.late_since is None:
                self.late_since = arrival
            return False
        self.late_since = None
        point: Point = (
            report.boot,
            report.seq,
            report.battery,
            report.pose.x,
            report.pose.y,
            report.speed,
            len(report.errors),
        )
        points = self.open.get(start)
        if points is None:
            self.open[start] = [point]
        elif _order(points[-1]) < _order(point):
            self.open[start] = [*points, point]  # the usual case: reports arrive in order
        else:
            i = bisect_left(points, _order(point), key=_order)
            if i == len(points) or _order(points[i]) != _order(point):
                self.open[start] = [*points[:i], point, *points[i:]]
        return True

    def clock_went_back(self, arrival: float, rules: Rules) -> bool:
        """Whether the reports have been late long enough to mean the robot's clock moved."""
        since = self.late_since
        return since is not None and arrival - since >= rules.window_s + rules.allowed_lateness_s

    def rebase(
        self, robot_id: str, report: RobotReport, arrival: float, rules: Rules
    ) -> list[WindowStats]:
        """Close every open window and restart the watermark from ``report``'s clock.

        Returns the closed windows. Windows opened afterwards for minutes already closed
        carry the new ``part`` number, so they are kept beside the earlier ones.
        """
        closed = self._close(robot_id, sorted(self.open), rules)
        self.high = max(self.high, self.closed_end)
        self.closed_end = -math.inf
        self.offset = report.ts.timestamp() - rules.allowed_lateness_s - arrival
        self.part += 1
        self.late_since = None
        return closed

    def close_due(self, robot_id: str, progress: float, rules: Rules) -> list[WindowStats]:
        """Close (and return, oldest first) every window the arrival clock ``progress`` passed."""
        if not self.open:
            return []
        # The same expression as close_at, so a progress equal to close_at always closes
        # that window (progress + offset could round a hair below its end).
        offset, length = self.offset, rules.window_s
        due = sorted(s for s in self.open if s + length - offset <= progress)
        return self._close(robot_id, due, rules) if due else []

    def flush(self, robot_id: str, rules: Rules) -> list[WindowStats]:
        """Close and return every open window, oldest first (end of stream, tests)."""
        return self._close(robot_id, sorted(self.open), rules)

    def _close(self, robot_id: str, starts: list[int], rules: Rules) -> list[WindowStats]:
        closed = [
            _stats(
                robot_id,
                s,
                self.part if s < self.high else 0,
                rules.window_s,
                self.open.pop(s),
            )
            for s in starts
        ]
        if starts:
            self.closed_end = max(self.closed_end, starts[-1] + rules.window_s)
        return closed

    def copy(self) -> Windows:
        """An independent copy (lists are never changed in place, see the class doc)."""
        return msgspec.structs.replace(self, open=dict(self.open))
