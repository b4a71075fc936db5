"""Event-time tumbling windows of one robot, closed by that robot's watermark.

Windows are ``[start, start + window_s)`` aligned to the UNIX epoch and keyed by
``start`` (integer UNIX seconds). An open window holds running statistics, not the
reports (:class:`Window`): count, battery min/max and an exact sum, max speed, error
count, and the distance travelled in ``(boot, seq)`` order. To count duplicates once
and to keep the distance in the robot's own order whatever order reports arrive in,
it keeps the ``(boot, seq)`` it holds as runs of consecutive seqs, with the position
at each run's ends: a report arriving between two others replaces the segment
between its neighbours by the two through it. Sums are kept as exact partial sums
(Shewchuk), so every statistic is the same for any arrival order, to the last bit —
the same values as summing the sorted reports at the close.

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
from bisect import bisect_right
from datetime import UTC, datetime, timedelta

import msgspec

from dataflows.rules import Rules
from fleetpulse.schema import RobotReport, WindowStats

__all__ = ["Run", "Window", "Windows", "window_fits", "window_start"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# The whole seconds a window bound can take as a datetime (0001-01-01 to 9999-12-31 UTC).
_FIRST_S = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(seconds=1)
_LAST_S = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(seconds=1)

# Consecutive seqs of one boot held by a window, with the positions at both ends:
# (boot, first seq, last seq, x first, y first, x last, y last). Sorts by (boot, seq).
Run = tuple[int, int, int, float, float, float, float]


def _grow(partials: list[float], x: float) -> list[float]:
    """``partials`` plus ``x``, exactly: fsum(result) is the exactly rounded total.

    Shewchuk's algorithm (what math.fsum does inside); partials stay few (one or two).
    """
    out = []
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            out.append(lo)
        x = hi
    out.append(x)
    return out


class Window(msgspec.Struct, array_like=True, gc=False):
    """One open window's running statistics (part of the snapshotted state).

    Never changed in place: adding a report makes a new one.
    """

    count: int
    battery_min: float
    battery_max: float
    battery_sum: list[float]  # exact partial sums
    distance: list[float]  # exact partial sums of the segments in (boot, seq) order
    max_speed: float
    errors: int
    runs: list[Run]

    def added(self, report: RobotReport) -> Window | None:
        """This window with ``report`` counted; None if it holds that ``(boot, seq)``."""
        boot, seq = report.boot, report.seq
        x, y = report.pose.x, report.pose.y
        runs = self.runs
        i = bisect_right(runs, (boot, seq, math.inf))  # the first run starting after it
        before = runs[i - 1] if i else None
        after = runs[i] if i < len(runs) else None
        if before is not None and before[0] == boot and before[2] >= seq:
            return None  # already counted: the first one wins
        distance = self.distance
        if before is not None and after is not None:  # they were neighbours: not any more
            distance = _grow(distance, -math.hypot(after[3] - before[5], after[4] - before[6]))
        if before is not None:
            distance = _grow(distance, math.hypot(x - before[5], y - before[6]))
        if after is not None:
            distance = _grow(distance, math.hypot(after[3] - x, after[4] - y))
        lo, hi = i, i  # the runs [lo:hi] give way to the one that holds the report now
        first, last = seq, seq
        x0, y0, x1, y1 = x, y, x, y
        if before is not None and before[0] == boot and before[2] == seq - 1:
            lo, first, x0, y0 = i - 1, before[1], before[3], before[4]
        if after is not None and after[0] == boot and after[1] == seq + 1:
            hi, last, x1, y1 = i + 1, after[2], after[5], after[6]
        runs = [*runs[:lo], (boot, first, last, x0, y0, x1, y1), *runs[hi:]]
        battery = report.battery
        return Window(
            self.count + 1,
            min(self.battery_min, battery),
            max(self.battery_max, battery),
            _grow(self.battery_sum, battery),
            distance,
            max(self.max_speed, report.speed),
            self.errors + len(report.errors),
            runs,
        )

    @classmethod
    def first(cls, report: RobotReport) -> Window:
        """A window holding only ``report``."""
        b, x, y = report.battery, report.pose.x, report.pose.y
        run: Run = (report.boot, report.seq, report.seq, x, y, x, y)
        return cls(1, b, b, [b], [], report.speed, len(report.errors), [run])

    def stats(self, robot_id: str, start: int, part: int, window_s: int) -> WindowStats:
        """The closed window's statistics."""
        return WindowStats(
            robot_id=robot_id,
            window_start=_EPOCH + timedelta(seconds=start),
            window_end=_EPOCH + timedelta(seconds=start + window_s),
            count=self.count,
            battery_min=self.battery_min,
            battery_avg=math.fsum(self.battery_sum) / self.count,
            battery_max=self.battery_max,
            distance_m=math.fsum(self.distance),
            max_speed=self.max_speed,
            error_count=self.errors,
            part=part,
        )


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


class Windows(msgspec.Struct, kw_only=True, gc=False):
    """Open windows of one robot and its event clock (part of the snapshotted state).

    Open windows are never changed in place (:meth:`add` puts a new :class:`Window`),
    so a shallow copy of this Struct and of ``open`` is an independent copy (the robot
    logic copies before each step, so a step that fails leaves the state as it was).
    """

    open: dict[int, Window] = msgspec.field(default_factory=dict)
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
        window = self.open.get(start)
        if window is None:
            self.open[start] = Window.first(report)
        else:
            added = window.added(report)
            if added is not None:
                self.open[start] = added
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
        open_ = self.open
        if not open_:
            return []
        # The same expression as close_at, so a progress equal to close_at always closes
        # that window (progress + offset could round a hair below its end).
        offset, length = self.offset, rules.window_s
        if min(open_) + length - offset > progress:
            return []  # the usual case: nothing due yet
        due = sorted(s for s in open_ if s + length - offset <= progress)
        return self._close(robot_id, due, rules)

    def flush(self, robot_id: str, rules: Rules) -> list[WindowStats]:
        """Close and return every open window, oldest first (end of stream, tests)."""
        return self._close(robot_id, sorted(self.open), rules)

    def _close(self, robot_id: str, starts: list[int], rules: Rules) -> list[WindowStats]:
        closed = [
            self.open.pop(s).stats(robot_id, s, self.part if s < self.high else 0, rules.window_s)
            for s in starts
        ]
        if starts:
            self.closed_end = max(self.closed_end, starts[-1] + rules.window_s)
        return closed

    def copy(self) -> Windows:
        """An independent copy (lists are never changed in place, see the class doc)."""
        return msgspec.structs.replace(self, open=dict(self.open))
