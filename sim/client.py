"""Posting the fleet's reports to the ingest API, paced by the wall clock.

    drive(fleet, sender, ...)   turns sim time into wall time and hands reports over
    Sender                      single posts or batches, a fixed pool of workers
    Poster                      one pooled httpx.AsyncClient; retries 503 after Retry-After
    Tally                       what happened, for the progress line and the summary

A report is never dropped silently: a 503 or a network error is retried (and counted),
a 4xx is counted as rejected under its error code, and anything still unanswered when
the run is cut short is counted as ``unsent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import msgspec

from fleetpulse.schema import RobotReport, encode
from sim.fleet import Delivery, Fleet

__all__ = ["DriveResult", "Poster", "RobotTally", "Sender", "Tally", "drive"]

MAX_RETRY_AFTER_S = 60.0
MAX_BACKOFF_S = 5.0


@dataclass(slots=True)
class RobotTally:
    """One robot's counts and the newest ``(boot, seq)`` the server accepted."""

    sent: int = 0
    accepted: int = 0
    last: tuple[int, int] | None = None


@dataclass(slots=True)
class Tally:
    """Counts of reports (not requests), except ``retried``, which counts re-sent requests."""

    # Invariant once a run has ended: sent == accepted + sum(rejected) + unsent.
    sent: int = 0  # reports handed to the client (queued or posted)
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by error code
    retried: int = 0
    retry_causes: Counter[str] = field(default_factory=Counter)
    unsent: int = 0  # posted or queued, but never answered before the run ended
    requests: int = 0
    answered: int = 0  # requests that got any HTTP answer
    last_problem: str | None = None  # the newest network error or rejection, for people
    robots: dict[str, RobotTally] = field(default_factory=dict)

    def on_sent(self, reports: Sequence[RobotReport]) -> None:
        """Reports handed over for posting."""
        self.sent += len(reports)
        for r in reports:
            self.robots.setdefault(r.robot_id, RobotTally()).sent += 1

    def on_accepted(self, reports: Sequence[RobotReport]) -> None:
        """Reports the server confirmed durable (202)."""
        self.accepted += len(reports)
        for r in reports:
            robot = self.robots.setdefault(r.robot_id, RobotTally())
            robot.accepted += 1
            if robot.last is None or r.order > robot.last:
                robot.last = r.order

    def on_rejected(self, reports: Sequence[RobotReport], code: str, detail: str) -> None:
        """Reports the server refused for good (4xx, or a 5xx other than 503)."""
        self.rejected[code] += len(reports)
        self.last_problem = f"rejected ({code}): {detail}"


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 503 asks us to wait: delta-seconds or an HTTP date; 1 s when absent."""
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return 1.0
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return 1.0
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _error_code(response: httpx.Response) -> tuple[str, str]:
    """``(code, detail)`` from the API's ``{"error", "detail", "fields"}`` body."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"], str(body.get("detail", ""))
    return f"http_{response.status_code}", response.text[:200]


def _network_cause(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        # The async transport words it "All connection attempts failed"; the OS error
        # underneath says what happened.
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            cause = cause.__cause__ or cause.__context__
        return f"connect error: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return type(exc).__name__


class Poster:
    """Posts reports over one pooled client; retries until answered or told to give up."""

    def __init__(
        self,
        url: str,
        token: str,
        tally: Tally,
        *,
        concurrency: int,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.tally = tally
        self.url = url.rstrip("/")
        # Keep-alive for as many connections as workers: every request reuses one.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            limits=limits,
            timeout=timeout_s,
            transport=transport,
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()

    async def post(self, reports: Sequence[RobotReport], *, batch: bool) -> None:
        """Post until the server answers something other than 503; count the outcome.

        Cancelling the call (the run was cut short) counts the reports as ``unsent``.
        """
        tally = self.tally
        path = "/v1/reports/batch" if batch else "/v1/reports"
        body = encode(list(reports) if batch else reports[0])
        attempt = 0
        try:
            while True:
                tally.requests += 1
                try:
                    response = await self._client.post(path, content=body)
                except httpx.TransportError as exc:
                    cause = _network_cause(exc)
                    tally.last_problem = cause
                    # A timed-out request may have landed; a retry may then duplicate it,
                    # which the dataflow drops by (boot, seq).
                    delay = min(MAX_BACKOFF_S, 0.25 * 2**attempt)
                else:
                    tally.answered += 1
                    if response.status_code == 202:
                        tally.on_accepted(reports)
                        return
                    if response.status_code != 503:
                        tally.on_rejected(reports, *_error_code(response))
                        return
                    cause = "503"
                    tally.last_problem = "503 unavailable (Kafka not confirming); retrying"
                    delay = _retry_after(response)
                tally.retried += 1
                tally.retry_causes[cause] += 1
                attempt += 1
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            tally.unsent += len(reports)
            raise


class Sender:
    """Single posts or batches (across robots, up to ``batch`` or ``window_s``), ``workers``
    at a time; ``saturated`` tells the producer to wait (backpressure)."""

    def __init__(
        self, poster: Poster, *, workers: int, batch: int | None = None, window_s: float = 0.2
    ) -> None:
        self.poster = poster
        self.batch = batch
        self.window_s = window_s
        self._queue: asyncio.Queue[list[RobotReport]] = asyncio.Queue()
        self._pending: list[RobotReport] = []
        self._pending_since = 0.0
        self._limit = 2 * workers
        self._workers = [asyncio.create_task(self._work()) for _ in range(workers)]

    @property
    def saturated(self) -> bool:
        """More requests are waiting than the workers can start soon."""
        return self._queue.qsize() >= self._limit

    def submit(self, report: RobotReport, now: float) -> None:
        """Queue one report (into the open batch in batch mode); from here it counts as sent."""
        self.poster.tally.on_sent((report,))
        if self.batch is None:
            self._queue.put_nowait([report])
            return
        if not self._pending:
            self._pending_since = now
        self._pending.append(report)
        if len(self._pending) >= self.batch:
            self.flush()

    def deadline(self) -> float:
        """When the open batch must go out (loop time); inf when none is open."""
        return self._pending_since + self.window_s if self._pending else math.inf

    def flush(self) -> None:
        """Send the open batch now."""
        if self._pending:
            self._queue.put_nowait(self._pending)
            self._pending = []

    async def drain(self, grace_s: float, force: asyncio.Event) -> None:
        """Send what is queued and wait for every answer, at most ``grace_s`` or until
        ``force``; then cancel, counting what is left as ``unsent``."""
        self.flush()
        tally = self.poster.tally
        # A server that has never answered and already failed us will not start now:
        # waiting for it at the end helps nobody.
        if tally.answered > 0 or tally.retried == 0:
            joined = asyncio.ensure_future(self._queue.join())
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait(
                {joined, forced}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            for extra in (joined, forced):
                extra.cancel()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            tally.unsent += len(self._queue.get_nowait())

    async def _work(self) -> None:
        while True:
            reports = await self._queue.get()
            try:
                await self.poster.post(reports, batch=self.batch is not None)
            finally:
                self._queue.task_done()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        await asyncio.sleep(0)  # still yield, so workers and signals get their turn
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass(slots=True)
class DriveResult:
    """How the generating loop ended."""

    reason: str  # "duration", "count" or "stopped"
    elapsed_s: float
    held_back: int  # generated but never posted: cut off by --count, or the end came while behind
    max_lag_s: float  # how far behind its schedule the slowest report was handed over


async def drive(
    fleet: Fleet,
    sender: Sender,
    stop: asyncio.Event,
    *,
    duration_s: float | None = None,
    count: int | None = None,
) -> DriveResult:
    """Generate reports on the wall clock (sim second 0 = now) and hand them to ``sender``
    until ``duration_s``, ``count`` reports, or ``stop``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    handed, max_lag = 0, 0.0
    due: deque[Delivery] = deque()  # generated, not yet handed over

    def elapsed() -> float:
        return loop.time() - start

    def ended() -> str | None:
        if count is not None and handed >= count:
            return "count"
        if stop.is_set():
            return "stopped"
        if duration_s is not None and elapsed() >= duration_s:
            return "duration"
        return None

    reason: str | None = None
    while reason is None:
        now = elapsed()
        due.extend(fleet.advance(now if duration_s is None else min(now, duration_s)))
        while due and reason is None:
            if count is not None and handed >= count:
                reason = "count"
            elif sender.saturated:
                # Backpressure: a slow or absent server makes reports go out late instead
                # of growing an unbounded queue (a real robot would buffer, too). The end
                # of the run still comes on time.
                reason = ended()
                if reason is None:
                    await _sleep_or_stop(stop, 0.02)
            else:
                delivery = due.popleft()
                max_lag = max(max_lag, elapsed() - delivery.at)
                sender.submit(delivery.report, loop.time())
                handed += 1
        reason = reason or ended()
        if reason is None:
            if loop.time() >= sender.deadline():
                sender.flush()
            wake = min(fleet.next_due() + start, sender.deadline())
            if duration_s is not None:
                wake = min(wake, start + duration_s)
            await _sleep_or_stop(stop, wake - loop.time())
    end = elapsed()
    held = fleet.flush(end)
    if reason != "count" and not due:
        # A timed or interrupted end that kept up: the held-back (out-of-order) reports
        # were due before the end, so they still go out.
        for delivery in held:
            sender.submit(delivery.report, loop.time())
        held = []
    return DriveResult(reason, end, len(due) + len(held), max_lag)
