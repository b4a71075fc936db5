"""The dataflow's keyed step: one Bytewax key per *shard* of robots, not per robot.

Robots are hashed into ``FLEETPULSE_SHARDS`` shards (:func:`shard_key`); the state of
a shard is a dict of :class:`~dataflows.robot.RobotState`. Why shards rather than one
Bytewax key per robot:

* **The arrival clock reaches every robot.** Offline detection and window closing run
  on the source's progress (``dataflows.records.Progress``: partition p has been read
  up to append time t), not on the flow's own clock. The source sends each progress
  mark to every shard, behind the messages it read before, on the same channel; a
  shard applies it to the robots of that partition. A per-robot key could only be
  told by sending a mark per robot.
* **Per-key costs go.** Bytewax calls the logic, routes and snapshots per key; with
  shards a call carries many reports.

A shard wraps the pure logic of ``dataflows.robot`` with the I/O glue: decoding and
checking each message (``dataflows.classify``), tracing sampled reports, and timers on
the arrival clock (:class:`Timers`). One robot's failure stays its own: an exception
in its step becomes a dead letter of kind ``error`` and its state stays as it was.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from bytewax.operators import StatefulBatchLogic

from dataflows.classify import classify
from dataflows.incidents import acknowledge
from dataflows.records import Control, DeadLetter, Out, Progress, Raw, Republish
from dataflows.robot import (
    Emits,
    RobotState,
    offline_at,
    on_control,
    on_progress,
    on_report,
    rules_due,
)
from dataflows.rules import LiveRules, Rules
from dataflows.spans import FlowSpans, sampled_parent
from dataflows.windows import Windows

__all__ = [
    "SHARD_FORMAT",
    "Item",
    "ShardLogic",
    "ShardState",
    "Timers",
    "shard_key",
    "shard_keys",
]

log = logging.getLogger("fleetpulse.dataflow")

# The version of ShardState's layout. Bump it when a persisted field is removed or
# changes meaning: snapshots of another format are then not loaded (the flow starts
# clean and replays the retained log, which the idempotent sink makes safe).
# 1: open windows as lists of points; 2: as running statistics (windows.Window);
# 3: reports held for the alert rules as compact samples (incidents.Sample).
SHARD_FORMAT = 3

Item = Raw | Progress | DeadLetter | Control | Republish


def shard_key(robot_id: str, shards: int) -> str:
    """The Bytewax key of the shard that holds ``robot_id`` (stable across processes)."""
    # crc32, not hash(): Python's str hash differs per process.
    return f"s{zlib.crc32(robot_id.encode()) % shards}"


def shard_keys(shards: int) -> list[str]:
    """Every shard key, e.g. for sending a progress mark to all shards."""
    return [f"s{i}" for i in range(shards)]


class ShardState(msgspec.Struct, kw_only=True):
    """One shard's snapshot, msgpack-encoded: a persisted format (see SHARD_FORMAT).

    ``binding`` names the Kafka cluster, topic (by id) and shard count the robots'
    state was built from; a snapshot bound to anything else is not loaded.
    """

    format: int = SHARD_FORMAT
    binding: str = ""
    robots: dict[str, RobotState] = msgspec.field(default_factory=dict)


class _EncodedShard(msgspec.Struct, kw_only=True):
    """ShardState with each robot already encoded: the same bytes, built from a cache."""

    format: int = SHARD_FORMAT
    binding: str = ""
    robots: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)


_ENCODER = msgspec.msgpack.Encoder()
_ROBOT = msgspec.msgpack.Decoder(RobotState)
_ENCODED = msgspec.msgpack.Decoder(_EncodedShard)


class Timers:
    """Which robots of a shard need a look when a partition's arrival clock moves.

    Offline: per partition, the online robots in the order their last report arrived
    (a dict used as an LRU list; arrivals within a partition only grow), so the due
    ones are always at the front. Retirement: the same for every robot, online or not
    (:meth:`silent`). Windows: per partition, robots bucketed by the whole second at or
    after their earliest window close, with a heap of buckets.
    """

    def __init__(self) -> None:
        self._online: dict[int, dict[str, None]] = {}
        self._online_at: dict[str, tuple[int, float]] = {}  # robot -> (partition, last_seen)
        self._seen: dict[int, dict[str, float]] = {}  # partition -> robot -> last_seen
        self._seen_in: dict[str, int] = {}  # robot -> its partition in _seen
        self._buckets: dict[int, dict[int, set[str]]] = {}
        self._heaps: dict[int, list[int]] = {}
        self._bucket_of: dict[str, tuple[int, int]] = {}

    def track(self, robot: str, state: RobotState, rules: Rules) -> None:
        """Note ``state`` as the robot's current state (after any step that changed it)."""
        partition = state.partition
        last_seen = state.live.last_seen
        was = self._seen_in.get(robot)
        if was is None or self._seen[was][robot] != last_seen or was != partition:
            if was is not None:
                del self._seen[was][robot]
            self._seen.setdefault(partition, {})[robot] = last_seen
            self._seen_in[robot] = partition
        seen = (partition, last_seen) if state.live.online else None
        old = self._online_at.get(robot)
        # Only a new arrival moves a robot to the back, which keeps each list sorted.
        if seen != old:
            if old is not None:
                del self._online[old[0]][robot]
                del self._online_at[robot]
            if seen is not None:
                self._online.setdefault(partition, {})[robot] = None
                self._online_at[robot] = seen
        close = state.windows.close_at(rules)
        held = rules_due(state, rules)
        if held is not None and (close is None or held < close):
            close = held
        want = None if close is None else (partition, math.ceil(close))
        have = self._bucket_of.get(robot)
        if want == have:
            return
        if have is not None:
            self._buckets[have[0]][have[1]].discard(robot)
            del self._bucket_of[robot]
        if want is not None:
            buckets = self._buckets.setdefault(want[0], {})
            members = buckets.get(want[1])
            if members is None:
                members = buckets[want[1]] = set()
                heapq.heappush(self._heaps.setdefault(want[0], []), want[1])
            members.add(robot)
            self._bucket_of[robot] = want

    def forget(self, robot: str) -> None:
        """Drop ``robot`` from every timer (it was retired)."""
        was = self._seen_in.pop(robot, None)
        if was is not None:
            del self._seen[was][robot]
        online = self._online_at.pop(robot, None)
        if online is not None:
            del self._online[online[0]][robot]
        bucket = self._bucket_of.pop(robot, None)
        if bucket is not None:
            self._buckets[bucket[0]][bucket[1]].discard(robot)

    def silent(self, partition: int, since: float) -> list[str]:
        """Robots of ``partition`` whose last report arrived at or before ``since``, oldest
        first; they stay tracked until :meth:`forget`."""
        out: list[str] = []
        for robot, last_seen in self._seen.get(partition, {}).items():
            if last_seen > since:
                break
            out.append(robot)
        return out

    def due(
        self, partition: int, progress: float, robots: dict[str, RobotState], rules: Rules
    ) -> list[str]:
        """Robots of ``partition`` with an offline deadline or window close at or before
        ``progress``; each leaves the timers until :meth:`track` is called for it again."""
        out: list[str] = []
        lru = self._online.get(partition, {})
        for robot in lru:
            deadline = offline_at(robots[robot], rules)
            if deadline is None or deadline > progress:
                break
            out.append(robot)
        for robot in out:
            del lru[robot]
            del self._online_at[robot]
        heap = self._heaps.get(partition)
        buckets = self._buckets.get(partition, {})
        while heap and heap[0] <= progress:
            for robot in buckets.pop(heapq.heappop(heap), ()):
                del self._bucket_of[robot]
                out.append(robot)
        return list(dict.fromkeys(out))


class ShardLogic(StatefulBatchLogic[Item, Out, bytes]):
    """One shard's robots in Bytewax: the pure logic of ``dataflows.robot`` plus glue."""

    def __init__(
        self,
        rules: Rules | LiveRules,
        spans: FlowSpans | None,
        binding: str,
        resume: bytes | None,
        on_snapshot: Callable[[], None] | None = None,
    ) -> None:
        # Shared by every shard of the process; a hot reload replaces its rules whole.
        self.live = rules if isinstance(rules, LiveRules) else LiveRules(rules)
        self.rules = self.live.current
        self.spans = spans  # None: no spans at all (benchmarks, unit tests)
        self.binding = binding
        self.on_snapshot = on_snapshot
        self.robots: dict[str, RobotState] = {}
        self.progress: dict[int, float] = {}  # partition -> arrival clock read up to
        self.timers = Timers()
        self._snapshot: bytes | None = None  # the encoded state while nothing changed
        # Each robot's encoded state, and the robots changed since: a snapshot encodes
        # only those (the whole shard is snapshotted whenever any robot of it moved).
        self._encoded: dict[str, msgspec.Raw] = {}
        self._dirty: set[str] = set()
        self._republished = ""  # the last Republish token answered
        if resume is not None:
            self._encoded, self.robots = _restore(resume, binding)
            # Rebuild the timers in arrival order, so each partition's LRU is sorted.
            for robot, st in sorted(self.robots.items(), key=lambda kv: kv[1].live.last_seen):
                self.timers.track(robot, st, self.rules)
            self._snapshot = resume if self.robots else None

    def on_batch(self, values: list[Item]) -> tuple[list[Out], bool]:
        rules = self.live.current
        if rules is not self.rules:
            self._use(rules)
        out = Out()
        for item in values:
            if type(item) is tuple:
                if len(item) == 6:
                    self._report(item, out)
                else:
                    self._progress(item, out)
            elif isinstance(item, DeadLetter):
                out.dead.append(item)
            elif isinstance(item, Control):
                self._control(item, out)
            elif isinstance(item, Republish):
                self._republish(item, out)
        return ([out] if out else []), self.RETAIN

    def notify_at(self) -> None:
        return None  # every timer runs on the source's progress marks, not the clock

    def snapshot(self) -> bytes:
        if self._snapshot is None:
            encoded, robots = self._encoded, self.robots
            for robot in self._dirty:
                encoded[robot] = msgspec.Raw(_ENCODER.encode(robots[robot]))
            self._dirty.clear()
            self._snapshot = _ENCODER.encode(_EncodedShard(binding=self.binding, robots=encoded))
        if self.on_snapshot is not None:
            self.on_snapshot()
        return self._snapshot

    def _use(self, rules: Rules) -> None:
        """Run under ``rules`` from this batch on (a hot reload replaced them).

        Thresholds are read at each step and offline deadlines at each progress mark
        (``Timers.due``), so they follow by themselves. The lateness does not: each
        robot's watermark offset is the largest ``ts - allowed_lateness - arrival`` seen,
        so it is restated under the new lateness (as if it had always been in force)
        and the window timers move with it. Lateness grown: open windows close later;
        shrunk: sooner, at the next progress mark. Windows already closed stay closed.
        ``window_s`` is restart-only (open windows are laid out by it).
        """
        shift = rules.allowed_lateness_s - self.rules.allowed_lateness_s
        self.rules = rules
        if not shift:
            return
        for robot, st in self.robots.items():
            windows = st.windows
            if windows.offset == -math.inf:
                continue  # no report counted yet: nothing to restate
            windows = msgspec.structs.replace(windows, offset=windows.offset - shift)
            state = msgspec.structs.replace(st, windows=windows)
            self.robots[robot] = state
            self._dirty.add(robot)
            self.timers.track(robot, state, rules)
        self._snapshot = None

    # --- items --------------------------------------------------------------------------
    def _report(self, raw: Raw, out: Out) -> None:
        report = classify(raw, self.rules)
        if isinstance(report, DeadLetter):
            out.dead.append(report)
            return
        robot, value, traceparent, partition, offset, arrival_ms = raw
        prev = self.robots.get(robot)
        cap = self.rules.max_robots_per_shard
        if prev is None and cap and len(self.robots) >= cap:
            reason = (
                f"robot limit: robot {robot} is new and its shard holds {len(self.robots)} "
                f"robots, its share of FLEETPULSE_MAX_ROBOTS"
            )
            out.dead.append(DeadLetter(robot.encode(), value, "limit", reason, partition, offset))
            return
        arrival = arrival_ms / 1000
        parent = sampled_parent(traceparent) if self.spans is not None and traceparent else None
        try:
            if parent is None:
                state, emits = on_report(prev, report, arrival, partition, self.rules)
            else:
                started = time.time_ns()
                state, emits = on_report(prev, report, arrival, partition, self.rules)
                ids = self.spans.record(  # type: ignore[union-attr]
                    "process report",
                    parent,
                    started,
                    time.time_ns(),
                    {
                        "robot_id": robot,
                        "boot": report.boot,
                        "seq": report.seq,
                        "messaging.kafka.partition": partition,
                        "messaging.kafka.offset": offset,
                        "applied": emits.applied > 0,
                    },
                )
                if emits.states:
                    out.traced.append(ids)
        except Exception as exc:  # one robot's failure must not stop the flow
            out.errors += 1
            out.dead.append(_error(robot, value, partition, offset, "report step", exc))
            return
        self._keep(robot, state, emits, out)
        if emits.applied:
            out.appended_ms[robot] = arrival_ms
        for late in emits.late:
            out.dead.append(
                DeadLetter(
                    robot.encode(),
                    value,
                    "late",
                    f"late: event time {late.ts.isoformat()} is behind the closed window",
                    partition,
                    offset,
                )
            )

    def _progress(self, mark: Progress, out: Out) -> None:
        partition, ms = mark
        progress = ms / 1000
        if progress <= self.progress.get(partition, -math.inf):
            return
        self.progress[partition] = progress
        self._expire(partition, progress, ms, out)
        for robot in self.timers.due(partition, progress, self.robots, self.rules):
            st = self.robots[robot]
            try:
                state, emits = on_progress(st, progress, self.rules)
            except Exception as exc:
                # The same timer would fail again at once: drop what it was for (the
                # robot's open windows), then judge its silence alone.
                out.errors += 1
                dropped = len(st.windows.open)
                out.dead.append(
                    _error(
                        robot,
                        None,
                        partition,
                        -1,
                        f"progress step ({dropped} open window(s) dropped)",
                        exc,
                    )
                )
                state = msgspec.structs.replace(st, windows=Windows())
                try:
                    state, emits = on_progress(state, progress, self.rules)
                except Exception:  # never seen: then forget this silence rather than loop
                    live = msgspec.structs.replace(st.live, online=False)
                    state, emits = msgspec.structs.replace(state, live=live), Emits()
                self._dirty.add(robot)  # changed even if nothing was emitted
                self._snapshot = None
            self._keep(robot, state, emits, out)

    def _expire(self, partition: int, progress: float, ms: int, out: Out) -> None:
        """Retire the robots of ``partition`` silent for FLEETPULSE_RETIRE_AFTER_S."""
        after = self.rules.retire_after_s
        if not after:
            return
        silent = self.timers.silent(partition, progress - after)
        for robot in silent:
            self._forget(robot)
            out.retire(robot, ms, "retention", "")
        if silent:
            log.info(
                "%d robot(s) retired after %g s without a report (e.g. %s)",
                len(silent),
                after,
                silent[0],
                extra={"audit": True},
            )

    def _forget(self, robot: str) -> None:
        self.robots.pop(robot, None)
        self._encoded.pop(robot, None)
        self._dirty.discard(robot)
        self.timers.forget(robot)
        self._snapshot = None

    def _control(self, control: Control, out: Out) -> None:
        robot = control.robot_id
        if control.action == "ack":
            self._ack(control, out)
            return
        if control.action == "retire":
            # Even a robot this shard does not hold: Redis may keep what it wrote before.
            known = robot in self.robots
            self._forget(robot)
            out.retire(robot, control.arrival_ms, "admin", control.by)
            log.info(
                "robot %s retired (by %s, offset %d)%s",
                robot,
                control.by,
                control.offset,
                "" if known else "; the dataflow held no state for it",
                extra={"audit": True},
            )
            return
        st = self.robots.get(robot)
        if st is None:
            log.warning(
                "control %s for robot %s, which never reported: ignored", control.action, robot
            )
            return
        try:
            state, emits = on_control(st, control, self.rules)
        except Exception as exc:
            out.errors += 1
            out.dead.append(
                _error(robot, None, control.partition, control.offset, "control step", exc)
            )
            return
        log.info(
            "ordering of robot %s reset (by %s, offset %d)",
            robot,
            control.by,
            control.offset,
            extra={"audit": True},
        )
        self._keep(robot, state, emits, out)

    def _ack(self, control: Control, out: Out) -> None:
        """An operator acknowledged one of the robot's open incidents."""
        robot = control.robot_id
        st = self.robots.get(robot)
        at = datetime.fromtimestamp(control.arrival_ms / 1000, UTC)
        tracks = dict(st.tracks) if st is not None else {}
        acked = acknowledge(tracks, control.incident, at, control.by)
        if st is None or acked is None:
            log.info(
                "ack of incident %s (by %s): not open; nothing to do",
                control.incident,
                control.by,
                extra={"audit": True},
            )
            return
        state = msgspec.structs.replace(st, tracks=tracks)
        log.info(
            "incident %s acknowledged (by %s, offset %d)",
            control.incident,
            control.by,
            control.offset,
            extra={"audit": True},
        )
        self._keep(robot, state, Emits(incidents=[acked]), out)

    def _republish(self, request: Republish, out: Out) -> None:
        """Every robot's live state again (Redis may have lost some): once per token,
        though each source partition of each process passes the request on."""
        if request.token == self._republished:
            return
        self._republished = request.token
        out.states += [st.live for st in self.robots.values()]
        out.republished = request.token

    def _keep(self, robot: str, state: RobotState, emits: Emits, out: Out) -> None:
        self.robots[robot] = state
        if (
            emits.states or emits.windows or emits.late or emits.stale or emits.duplicate
            or state.held is not None or emits.incidents
        ):  # fmt: skip
            self._dirty.add(robot)  # changed: encode again at the next snapshot
            self._snapshot = None
        self.timers.track(robot, state, self.rules)
        out.states += emits.states
        out.alerts += emits.alerts
        out.windows += emits.windows
        out.applied += emits.applied
        out.stale += emits.stale
        out.duplicate += emits.duplicate
        out.incidents += emits.incidents


def _error(
    robot: str, value: bytes | None, partition: int, offset: int, what: str, exc: Exception
) -> DeadLetter:
    log.error("robot %s: the %s failed", robot, what, exc_info=exc)
    reason = f"robot {robot}: the {what} failed: {type(exc).__name__}: {exc}"
    return DeadLetter(robot.encode(), value, "error", reason[:1000], partition, offset)


_noted: set[str] = set()


def _restore(resume: bytes, binding: str) -> tuple[dict[str, msgspec.Raw], dict[str, RobotState]]:
    """A snapshot's robots, encoded and decoded; none if it belongs to another log or
    format (or any robot of it cannot be read)."""
    try:
        state = _ENCODED.decode(resume)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _note_clean(f"a shard snapshot could not be read ({exc})")
        return {}, {}
    if state.format != SHARD_FORMAT:
        _note_clean(f"shard snapshots have format {state.format}, this flow reads {SHARD_FORMAT}")
        return {}, {}
    if state.binding != binding:
        _note_clean(f"shard snapshots belong to {state.binding}, this flow reads {binding}")
        return {}, {}
    try:
        robots = {robot: _ROBOT.decode(raw) for robot, raw in state.robots.items()}
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _note_clean(f"a shard snapshot could not be read ({exc})")
        return {}, {}
    return dict(state.robots), robots


def _note_clean(why: str) -> None:
    if why not in _noted:  # once per process, not once per shard
        _noted.add(why)
        log.error("%s: starting with empty state; the log is replayed from its start", why)
