"""Keeping Redis the whole projection of the flow's state: detection and the on-demand
rebuild (``just rebuild-state``). The bookkeeping lives in :mod:`state.projection`.

In the flow: each process runs one :class:`ProjectionWatch` (a daemon thread, started
with the first source partition of a tailing flow). Every :data:`CHECK_S` it compares
the run_id of the Redis server the flow writes to with the one the live state was last
completely published to; when they differ (a Sentinel failover, a restart, an empty or
flushed Redis, a rebuild request) it claims the re-publish. The process's source
partitions then send a :class:`~dataflows.records.Republish` mark to every shard, on
the same channel as the reports, and every shard emits all its robots' live state;
the sinks write them (idempotent: what Redis holds is a no-op, what it lost comes
back) and record the shards done; the last one stores the server as published.

    python -m dataflows.republish [--timeout S]    ask the running flow, wait, show progress

Why from the flow's state and not by replaying Kafka into a fresh projection: the
flow's state is exactly what Redis should show, it is checkpointed, and writing it
costs one state write per robot; a replay costs a drain of the whole retained log
(minutes at fleet scale), and the log may already have dropped (retention) reports
whose effect the state still holds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence

import redis

from fleetpulse.errors import FleetpulseError
from fleetpulse.settings import Settings, load_settings
from observability.metrics import DataflowMetrics
from state.connect import connect
from state.projection import Projection

__all__ = ["CHECK_S", "ProjectionWatch", "main"]

log = logging.getLogger("fleetpulse.dataflow.republish")

CHECK_S = 1.0  # how often each flow process checks that Redis is the projection
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)


class ProjectionWatch:
    """One per flow process: finds Redis incomplete and claims the re-publish.

    ``pending`` is the token of the newest re-publish this process claimed; the source
    partitions pass it on to every shard once.
    """

    def __init__(self, settings: Settings, metrics: DataflowMetrics | None) -> None:
        self.projection = Projection(connect(settings), settings.redis_prefix)
        self.pending = ""
        self.metrics = metrics
        self._failing = False
        threading.Thread(target=self._run, name="projection-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                self.check()
                self._failing = False
            except _TRANSIENT as exc:  # the master is away: the sink waits for it too
                if not self._failing:
                    log.warning("cannot check the Redis projection (%s); retrying", exc)
                self._failing = True
            except Exception:
                log.exception("checking the Redis projection failed; retrying")
            time.sleep(CHECK_S)

    def check(self) -> str | None:
        """One look: the token claimed, or None if Redis is complete (or another
        process's re-publish is under way)."""
        p = self.projection
        server, published = p.server(), p.published_to()
        if published == server:
            return None
        token = p.claim(server)
        if token is None:
            return None
        why = (
            "nothing is recorded as published (an empty or flushed Redis, a first start, "
            "or a rebuild request)"
            if published is None
            else f"it was last completely published to Redis {published[:12]}, "
            f"and the flow now writes to {server[:12]} (a failover or a restart)"
        )
        log.warning("re-publishing every robot's live state (%s): %s", token, why)
        self.pending = token
        if self.metrics is not None:
            self.metrics.republishes.labels("claimed").inc()
        return token


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rebuild-state",
        description="Ask the running dataflow to write every robot's live state to Redis "
        "again, and wait until it has.",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after S (300)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        projection = Projection(connect(settings), settings.redis_prefix)
        projection.request()
        print("asked the dataflow to re-publish its live state; waiting ...", flush=True)
        started = time.monotonic()
        token, shown = None, -1
        while True:
            if time.monotonic() - started > args.timeout:
                print(
                    f"error: not re-published after {args.timeout:.0f}s; is the dataflow "
                    "running against this Redis (`./dev main`, `just dataflow`)?",
                    file=sys.stderr,
                )
                return 1
            server = projection.server()
            if projection.published_to() == server:
                took = time.monotonic() - started
                print(f"done: Redis {server[:12]} holds the flow's live state ({took:.1f}s)")
                return 0
            token = projection.under_way() or token
            if token is not None:
                done = projection.progress(token)
                if done != shown:
                    print(f"  {done}/{settings.shards} shards written", flush=True)
                    shown = done
            time.sleep(0.2)
    except (FleetpulseError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
