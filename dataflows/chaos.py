"""Fault injection for tests (``FLEETPULSE_CHAOS``): the flow kills itself at chosen points.

``snapshot:0.05,sink:0.02`` means: each time a shard is snapshotted, with probability
0.05, and each time the sink has written a batch to Redis but not yet sent its alerts
and dead letters to Kafka, with probability 0.02, the process sends itself SIGKILL —
the moments a crash is hardest to survive, reached far more often than an outside
``kill -9`` at a random time would. The crash-consistency tests use it; production
never sets it.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Callable

__all__ = ["Chaos"]


class Chaos:
    """Probabilities of killing the process, by point name."""

    def __init__(self, points: dict[str, float]) -> None:
        self.points = points
        self._rng = random.Random()  # seeded from the OS: every run dies somewhere else

    @classmethod
    def parse(cls, spec: str) -> Chaos:
        """``point:probability,...`` (validated by the settings' pattern)."""
        points: dict[str, float] = {}
        for part in filter(None, spec.split(",")):
            name, _, probability = part.partition(":")
            points[name] = float(probability)
        return cls(points)

    def point(self, name: str) -> Callable[[], None] | None:
        """A function to call at point ``name`` (None when that point is not armed)."""
        probability = self.points.get(name, 0.0)
        if probability <= 0:
            return None

        def maybe_die() -> None:
            if self._rng.random() < probability:
                print(f"fleetpulse chaos: SIGKILL at {name}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        return maybe_die
