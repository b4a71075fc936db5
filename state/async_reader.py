"""The query routes' reader on redis.asyncio, with the commands of concurrent reads
sent together.

:class:`AsyncRedisStateReader` runs the plans of :mod:`state.reads` (the reads the
blocking :class:`~state.reader.RedisStateReader` runs too) on the event loop, so a
request costs no worker thread. Its commands go through :class:`_Batches`: a command
that finds a batch in flight waits for it to come back, then goes out with every
command queued meanwhile, in one pipeline. Under load the requests of a worker reach
Redis within the same few hundred microseconds, and redis-py's client costs per call
(a pool checkout, a timeout, a parse) were a third of a GET's time when each went on
its own; a batch pays them once. An idle reader sends a lone command at once (one
turn of the event loop later). Commands are independent reads: a batch is not a
transaction, and each command gets its own reply or error.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import redis
import redis.asyncio

from fleetpulse.alert_rules import Incident, IncidentState, Severity
from fleetpulse.schema import Alert, AlertKind, LiveState, RobotReport, Status, WindowStats
from fleetpulse.settings import Settings
from state.keys import Keys
from state.reader import RedisStateReader
from state.reads import (
    PAGE_SCRIPT,
    Command,
    FleetSummary,
    Plan,
    Reads,
    check_listing,
    state_decoder,
)

__all__ = ["AsyncRedisStateReader"]

_T = TypeVar("_T")


class _Batches:
    """Commands sent in batches: one pipeline in flight at a time, on ``client``'s pool."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._queue: list[tuple[Command, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def send(self, command: Command) -> Any:
        """The reply to ``command`` (its error raised), sent with the batch it joins."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, reply))
        if self._sender is None:
            self._sender = loop.create_task(self._drain(), name="redis batches")
        return await reply

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # the tasks already running queue their commands first
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    replies = await self._pipeline([command for command, _ in batch])
                except Exception as exc:  # the connection failed: every command did
                    replies = [exc] * len(batch)
                except BaseException:  # cancelled: the batch's requests end with it
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its request was cancelled meanwhile
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self._sender = None
            # Only when cancelled (the app is stopping): no command may wait forever.
            for _, future in self._queue:
                future.cancel()
            self._queue = []

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        if len(commands) == 1:
            try:
                return [await self._client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            except redis.ResponseError as exc:  # its own error, not the connection's
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)


class AsyncRedisStateReader:
    """:class:`~state.reader.AsyncStateReader` on redis.asyncio: the plans of
    :mod:`state.reads`, awaited on the event loop, their commands sent in batches.

    ``blocking`` is the blocking reader of the same store; listings with ``battery_lt``
    run through it in a worker thread (see :mod:`state.reader`).
    """

    def __init__(
        self, client: redis.asyncio.Redis, settings: Settings, blocking: RedisStateReader
    ) -> None:
        """Read through ``client``; key names come from ``settings.redis_prefix``."""
        self._client = client
        self._batches = _Batches(client)
        self._reads = Reads(Keys(settings.redis_prefix))
        self._blocking = blocking

    async def run(self, plan: Plan[_T]) -> _T:
        """Run a plan of :mod:`state.reads` (or :mod:`state.export`) and return its answer;
        its commands go out in the batches of every concurrent read."""
        return await self._run(plan)

    async def _run(self, plan: Plan[_T]) -> _T:
        try:
            command = next(plan)
            while True:
                command = plan.send(await self._round_trip(command))
        except StopIteration as done:
            answer: _T = done.value
            return answer

    async def _round_trip(self, command: Command) -> Any:
        try:
            return await self._batches.send(command)
        except redis.exceptions.NoScriptError:
            # A restarted, flushed or failed-over server lost the script: load it, resend.
            await self._client.script_load(PAGE_SCRIPT)
            return await self._batches.send(command)

    async def get(self, robot_id: str) -> LiveState | None:
        """The live state of one robot, or None if it never reported."""
        raw = await self.get_raw(robot_id)
        return None if raw is None else state_decoder.decode(raw)

    async def get_raw(self, robot_id: str) -> bytes | None:
        """The robot's live state as the stored LiveState JSON, or None."""
        return await self._run(self._reads.get_raw(robot_id))

    async def list_robots(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[LiveState], str | None]:
        """Robots matching every filter, after ``cursor``, in robot-id order (see
        :meth:`RedisStateReader.list_robots`)."""
        raw, next_cursor = await self.list_robots_raw(
            status, site, online, battery_lt, cursor, limit
        )
        return [state_decoder.decode(s) for s in raw], next_cursor

    async def list_robots_raw(
        self,
        status: Status | None = None,
        site: str | None = None,
        online: bool | None = None,
        battery_lt: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[bytes], str | None]:
        """:meth:`list_robots` with each state as its stored LiveState JSON."""
        check_listing(limit, cursor, battery_lt)
        if battery_lt is None:
            return await self._run(self._reads.listing(status, site, online, cursor, limit))
        return await anyio.to_thread.run_sync(
            partial(self._blocking.list_robots_raw, status, site, online, battery_lt, cursor, limit)
        )

    async def history(
        self, robot_id: str, limit: int = 50, since: datetime | None = None
    ) -> list[RobotReport]:
        """Applied reports of one robot, newest ``(boot, seq)`` first."""
        return await self._run(self._reads.history(robot_id, limit, since))

    async def stats(
        self, robot_id: str, limit: int = 60, since: datetime | None = None
    ) -> list[WindowStats]:
        """Closed windows of one robot, newest window first; ``since``: start >= since."""
        return await self._run(self._reads.stats(robot_id, limit, since))

    async def summary(self) -> FleetSummary:
        """Fleet-wide counts, from the counters the writer keeps in one hash."""
        return await self._run(self._reads.summary())

    async def alerts(
        self,
        robot_id: str | None = None,
        kind: AlertKind | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Alert]:
        """Alerts, newest first (see :meth:`RedisStateReader.alerts`)."""
        return await self._run(self._reads.alerts(robot_id, kind, since, limit))

    async def incidents(
        self,
        robot_id: str | None = None,
        rule: str | None = None,
        state: IncidentState | None = None,
        severity: Severity | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Incident]:
        """Incidents, newest opened first (see :meth:`RedisStateReader.incidents`)."""
        plan = self._reads.incidents(robot_id, rule, state, severity, since, limit)
        return await self._run(plan)
