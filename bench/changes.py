"""When each robot report became visible in Redis, read from the change stream."""

from __future__ import annotations

import threading
import time

from deploy.local.harness import FlowProcess
from state.reader import RedisStateReader, StateChanged, decode_change

__all__ = ["VisibilityLog"]


class VisibilityLog:
    """Follows the change stream in a thread: ``seen[(robot, seq)]`` = Redis time (ms)
    of the first state change carrying that report (stream ids are Redis's own clock)."""

    def __init__(self, reader: RedisStateReader) -> None:
        self.reader = reader
        self.seen: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wait_for_flow(self, robot: str, flows: list[FlowProcess], timeout_s: float = 60) -> None:
        """Block until ``robot``'s state exists (the warm-up report went through)."""
        deadline = time.monotonic() + timeout_s
        while self.reader.get(robot) is None:
            if time.monotonic() > deadline:
                raise SystemExit("the dataflow did not start:\n" + flows[0].output())
            time.sleep(0.1)

    def start(self) -> None:
        """Follow every change made from now on."""
        after = self.reader.latest_change_id()

        def follow() -> None:
            nonlocal after
            while not self._stop.is_set():
                for entry_id, payload in self.reader.changes(after, 1000, block_ms=200):
                    after = entry_id
                    event = decode_change(payload)
                    if isinstance(event, StateChanged):
                        r = event.state.report
                        self.seen.setdefault((r.robot_id, r.seq), int(entry_id.split("-")[0]))

        self._thread = threading.Thread(target=follow, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
