"""Pure robot models for the simulator: movement, battery, faults, silences, delivery quirks.

No HTTP and no wall clock: a :class:`Fleet` is driven by simulated seconds since the
run's start (``t``), and every random choice comes from generators seeded by
``(seed, robot id)``. One seed therefore gives the same reports whatever the sizes
of the steps the caller advances by, and adding robots leaves the others unchanged.

A robot's life: idle → moving to a random waypoint → working there → next waypoint;
below its low-battery mark it drives to its dock and charges, then goes back to work.
Faults (status ``error`` with a non-empty ``errors`` list), e-stops and reboots
(``boot + 1``, ``seq`` from 0) interrupt that cycle at random or on a fixed schedule.
Silences suppress a robot's reports for a while (it keeps living); the delivery layer
may hold a report back behind the robot's next one (out of order) or repeat it.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from fleetpulse.schema import Pose, RobotReport, Status

__all__ = [
    "Delivery",
    "Fleet",
    "FleetConfig",
    "Reboot",
    "RebootSpec",
    "Silence",
    "SilenceSpec",
    "robot_ids",
]

# Per-second rates of the battery (percent). Faster than real robots on purpose, so a
# run of a few minutes shows every part of the cycle, charging included.
DRAIN_MOVING = 0.20
DRAIN_WORKING = 0.12
DRAIN_IDLE = 0.02
CHARGE_RATE = 1.5
# The longest drive to a dock on the default 60 x 40 m site at the slowest speed costs
# ~18 %, so a robot that turns back at >= 20 % reaches the dock; 0 % is a fallback only.
LOW_BATTERY_RANGE = (20.0, 30.0)
SPEED_RANGE = (0.8, 1.5)  # m/s
FAULT_CODES = (
    "E101 lidar timeout",
    "E204 motor overcurrent",
    "E310 localization lost",
    "E412 bumper contact",
    "E508 wheel encoder fault",
)

Mode = Literal["idle", "to_task", "working", "to_charger", "charging", "error", "estop", "off"]
_STATUS: dict[Mode, Status] = {
    "idle": "idle",
    "to_task": "moving",
    "working": "working",
    "to_charger": "moving",
    "charging": "charging",
    "error": "error",
    "estop": "estop",
}
# Modes in which a random fault, e-stop or reboot may strike.
_HEALTHY: frozenset[Mode] = frozenset({"idle", "to_task", "working", "to_charger", "charging"})


def robot_ids(count: int) -> list[str]:
    """The fleet's ids: ``amr-000``, ``amr-001``, ... (wider when there are more than 1000)."""
    width = max(3, len(str(count - 1)))
    return [f"amr-{i:0{width}d}" for i in range(count)]


@dataclass(frozen=True, slots=True)
class SilenceSpec:
    """A planned silence: ``robot_id`` sends nothing from ``start_s`` for ``duration_s``."""

    robot_id: str
    start_s: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class RebootSpec:
    """A planned reboot of ``robot_id`` at ``at_s`` seconds into the run."""

    robot_id: str
    at_s: float


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What the fleet looks like and how often things go wrong (probabilities per robot-second
    unless said otherwise)."""

    robots: int = 10
    rate: float = 1.0  # reports per second per robot
    sites: tuple[str, ...] = ()  # robots are spread over these round-robin; none: no site field
    seed: int = 0
    silences: tuple[SilenceSpec, ...] = ()
    reboots: tuple[RebootSpec, ...] = ()
    silence_prob: float = 0.0
    silence_range_s: tuple[float, float] = (3.0, 20.0)
    fault_prob: float = 0.002
    estop_prob: float = 0.001
    reboot_prob: float = 0.0005
    shuffle_prob: float = 0.0  # per report: delivered after the robot's next report
    duplicate_prob: float = 0.0  # per report: delivered twice
    clock_skew_s: float = 0.0  # each robot's clock is off by up to this much either way
    site_width_m: float = 60.0
    site_height_m: float = 40.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """A report handed to the network at sim time ``at``."""

    at: float
    report: RobotReport
    late: bool = False  # held back and delivered after a newer report of the same robot
    duplicate: bool = False  # a second copy of a report already delivered


@dataclass(frozen=True, slots=True)
class Silence:
    """A silence that happened: sim seconds and the same instants on the robot's clock."""

    robot_id: str
    start_s: float
    end_s: float
    start_ts: datetime
    end_ts: datetime


@dataclass(frozen=True, slots=True)
class Reboot:
    """A reboot that happened at ``at_s``; the robot comes back with ``boot``."""

    robot_id: str
    at_s: float
    boot: int


@dataclass(slots=True)
class Robot:
    """One robot's physical and logical state; ``step`` moves it along in sim time."""

    robot_id: str
    site: str | None
    rng: random.Random
    skew_s: float
    dock: tuple[float, float]
    width: float
    height: float
    x: float
    y: float
    battery: float
    max_speed: float
    low_pct: float
    theta: float = 0.0
    speed: float = 0.0
    boot: int = 0
    seq: int = 0
    mode: Mode = "idle"
    until: float = 0.0  # when the current timed mode (idle, working, error, ...) ends
    target: tuple[float, float] = (0.0, 0.0)
    full_pct: float = 100.0
    errors: list[str] = field(default_factory=list)
    rescue: bool = False  # ran flat: after the error, it is carried to its dock
    last_t: float = 0.0

    @property
    def status(self) -> Status | None:
        """The reported status, or None while the robot is off (rebooting)."""
        return _STATUS.get(self.mode)

    def step(self, t: float, cfg: FleetConfig) -> Reboot | None:
        """Advance from the last step to ``t``: random events, then movement and battery."""
        dt = max(0.0, t - self.last_t)
        self.last_t = t
        rebooted = self._random_events(t, dt, cfg)
        if self.mode in ("to_task", "to_charger"):
            self._drive(dt, t)
        else:
            self.speed = 0.0
        self._battery(dt, t)
        self._timers(t)
        return rebooted

    def reboot(self, t: float) -> Reboot:
        """Power off for a moment; the next report carries ``boot + 1`` and ``seq`` 0."""
        self.mode = "off"
        self.until = t + self.rng.uniform(1.0, 3.0)
        self.speed = 0.0
        self.errors = []
        self.boot += 1
        self.seq = 0
        return Reboot(self.robot_id, t, self.boot)

    def report(self, t: float, epoch: datetime) -> RobotReport:
        """The report the robot sends at ``t``; its ``ts`` is the robot's own (skewed) clock."""
        status = self.status
        assert status is not None, "a robot that is off sends nothing"
        out = RobotReport(
            robot_id=self.robot_id,
            boot=self.boot,
            seq=self.seq,
            ts=self.clock(t, epoch),
            status=status,
            battery=round(self.battery, 2),
            pose=Pose(x=round(self.x, 3), y=round(self.y, 3), theta=round(self.theta, 4)),
            speed=round(self.speed, 3),
            errors=list(self.errors),
            site=self.site,
        )
        self.seq += 1
        return out

    def clock(self, t: float, epoch: datetime) -> datetime:
        """What the robot's clock reads at sim time ``t``."""
        return epoch + timedelta(seconds=t + self.skew_s)

    def _random_events(self, t: float, dt: float, cfg: FleetConfig) -> Reboot | None:
        if self.mode not in _HEALTHY:
            return None
        roll = self.rng.random()
        # One roll split into bands keeps the events exclusive within a step.
        fault, estop, reboot = cfg.fault_prob * dt, cfg.estop_prob * dt, cfg.reboot_prob * dt
        if roll < fault:
            self.mode = "error"
            self.errors = self.rng.sample(FAULT_CODES, self.rng.randint(1, 2))
            self.until = t + self.rng.uniform(3.0, 15.0)
        elif roll < fault + estop:
            self.mode = "estop"
            self.until = t + self.rng.uniform(5.0, 20.0)
        elif roll < fault + estop + reboot:
            return self.reboot(t)
        return None

    def _drive(self, dt: float, t: float) -> None:
        dx, dy = self.target[0] - self.x, self.target[1] - self.y
        dist = math.hypot(dx, dy)
        if dist > 1e-9:
            self.theta = math.atan2(dy, dx)
        reach = self.max_speed * dt
        if dist <= reach:
            self.x, self.y = self.target
            self.speed = dist / dt if dt > 0 else 0.0
            self._arrive(t)
        else:
            self.x += dx / dist * reach
            self.y += dy / dist * reach
            self.speed = self.max_speed

    def _arrive(self, t: float) -> None:
        if self.mode == "to_charger":
            self.mode = "charging"
            self.full_pct = self.rng.uniform(90.0, 100.0)
        else:
            self.mode = "working"
            self.until = t + self.rng.uniform(4.0, 12.0)

    def _battery(self, dt: float, t: float) -> None:
        if self.mode == "charging":
            self.battery = min(100.0, self.battery + CHARGE_RATE * dt)
            return
        drain = {"to_task": DRAIN_MOVING, "to_charger": DRAIN_MOVING, "working": DRAIN_WORKING}
        self.battery = max(0.0, self.battery - drain.get(self.mode, DRAIN_IDLE) * dt)
        if self.battery <= 0.0 and self.mode not in ("error", "off"):
            self.mode = "error"
            self.errors = ["E001 battery depleted"]
            self.until = t + 20.0
            self.rescue = True

    def _timers(self, t: float) -> None:
        if self.mode == "charging" and self.battery >= self.full_pct:
            self._go_idle(t)
        elif self.mode in ("idle", "to_task", "working") and self.battery <= self.low_pct:
            self.mode, self.target = "to_charger", self.dock
        elif self.mode in ("error", "estop", "off") and t >= self.until:
            self.errors = []
            if self.rescue:
                # An operator pushed the flat robot onto its dock.
                self.rescue = False
                self.x, self.y = self.dock
                self.mode = "charging"
                self.full_pct = self.rng.uniform(90.0, 100.0)
            else:
                self._go_idle(t)
        elif self.mode in ("idle", "working") and t >= self.until:
            self.mode = "to_task"
            self.target = (
                self.rng.uniform(0.0, self.width),
                self.rng.uniform(0.0, self.height),
            )

    def _go_idle(self, t: float) -> None:
        self.mode = "idle"
        self.until = t + self.rng.uniform(0.5, 3.0)


def _new_robot(index: int, robot_id: str, cfg: FleetConfig) -> Robot:
    rng = random.Random(f"{cfg.seed}:{robot_id}")
    w, h = cfg.site_width_m, cfg.site_height_m
    site = cfg.sites[index % len(cfg.sites)] if cfg.sites else None
    return Robot(
        robot_id=robot_id,
        site=site,
        rng=rng,
        skew_s=rng.uniform(-cfg.clock_skew_s, cfg.clock_skew_s),
        dock=(rng.uniform(1.0, w - 1.0), 0.5),
        width=w,
        height=h,
        x=rng.uniform(0.0, w),
        y=rng.uniform(0.0, h),
        battery=rng.uniform(30.0, 100.0),
        max_speed=rng.uniform(*SPEED_RANGE),
        low_pct=rng.uniform(*LOW_BATTERY_RANGE),
        theta=rng.uniform(-math.pi, math.pi),
        until=rng.uniform(0.0, 3.0),
    )


class Fleet:
    """All robots, their report schedule, silences and the delivery quirks."""

    def __init__(self, config: FleetConfig, epoch: datetime) -> None:
        if epoch.tzinfo is None:
            raise ValueError("epoch must carry a timezone (reports need an RFC 3339 offset)")
        self.config = config
        self.epoch = epoch
        self.ids = robot_ids(config.robots)
        self._robots = [_new_robot(i, rid, config) for i, rid in enumerate(self.ids)]
        self._index = {rid: i for i, rid in enumerate(self.ids)}
        # Silences and delivery quirks (the network) draw from their own generators, so
        # turning them on or off does not change what the robots do.
        self._net_rng = [random.Random(f"{config.seed}:{rid}:net") for rid in self.ids]
        self._period = 1.0 / config.rate
        # (next tick time, robot index, tick number): phases spread robots over a period.
        self._heap: list[tuple[float, int, int]] = []
        self._phase: list[float] = []
        for i, robot in enumerate(self._robots):
            phase = robot.rng.uniform(0.0, self._period)
            self._phase.append(phase)
            self._heap.append((phase, i, 0))
        heapq.heapify(self._heap)
        self._planned: list[list[SilenceSpec]] = [[] for _ in self.ids]
        for spec in sorted(config.silences, key=lambda s: s.start_s):
            self._planned[self._index[spec.robot_id]].append(spec)
        self._started: list[set[int]] = [set() for _ in self.ids]  # planned ones begun
        self._reboot_plan: list[list[float]] = [[] for _ in self.ids]
        for rspec in sorted(config.reboots, key=lambda s: s.at_s):
            self._reboot_plan[self._index[rspec.robot_id]].append(rspec.at_s)
        self._quiet_until = [0.0 for _ in self.ids]  # end of the current random silence
        self._silences: list[tuple[int, float, float]] = []
        self._held: dict[int, Delivery] = {}
        self.reboots: list[Reboot] = []
        self.shuffled = 0
        self.duplicated = 0

    def next_due(self) -> float:
        """Sim time of the next report tick of any robot."""
        return self._heap[0][0] if self._heap else math.inf

    def advance(self, until: float) -> list[Delivery]:
        """Run every robot tick up to and including ``until``; the deliveries, in time order."""
        out: list[Delivery] = []
        while self._heap and self._heap[0][0] <= until:
            t, i, k = heapq.heappop(self._heap)
            out.extend(self._tick(i, t))
            # Tick times from the tick number, not by adding periods, so they never drift.
            heapq.heappush(self._heap, (self._phase[i] + (k + 1) * self._period, i, k + 1))
        return out

    def flush(self, at: float) -> list[Delivery]:
        """Release the reports held back for out-of-order delivery (at the end of a run)."""
        out = [replace(d, at=at, late=True) for _, d in sorted(self._held.items())]
        self._held.clear()
        return out

    def silences(self, now: float) -> list[Silence]:
        """The silences that began by ``now``, in start order, ends clipped to ``now``."""
        out = []
        for i, start, end in sorted(self._silences, key=lambda s: (s[1], s[0])):
            if start > now:
                continue
            robot = self._robots[i]
            end = min(end, now)
            out.append(
                Silence(
                    robot.robot_id,
                    start,
                    end,
                    robot.clock(start, self.epoch),
                    robot.clock(end, self.epoch),
                )
            )
        return out

    def _tick(self, i: int, t: float) -> list[Delivery]:
        robot = self._robots[i]
        plan = self._reboot_plan[i]
        if plan and plan[0] <= t:
            plan.pop(0)
            self.reboots.append(robot.reboot(t))
        rebooted = robot.step(t, self.config)
        if rebooted is not None:
            self.reboots.append(rebooted)
        if robot.mode == "off" or self._silent(i, t):
            return []
        return self._deliver(i, Delivery(t, robot.report(t, self.epoch)))

    def _silent(self, i: int, t: float) -> bool:
        silent = t < self._quiet_until[i]
        for n, spec in enumerate(self._planned[i]):
            end = spec.start_s + spec.duration_s
            if spec.start_s <= t and n not in self._started[i]:
                self._started[i].add(n)
                self._silences.append((i, spec.start_s, end))
            silent = silent or spec.start_s <= t < end
        if not silent and self.config.silence_prob > 0:
            rng = self._net_rng[i]
            if rng.random() < self.config.silence_prob * self._period:
                end = t + rng.uniform(*self.config.silence_range_s)
                self._quiet_until[i] = end
                self._silences.append((i, t, end))
                silent = True
        return silent

    def _deliver(self, i: int, fresh: Delivery) -> list[Delivery]:
        rng = self._net_rng[i]
        held = self._held.pop(i, None)
        out: list[Delivery] = []
        if held is None and rng.random() < self.config.shuffle_prob:
            self._held[i] = fresh  # goes out right after this robot's next report
            self.shuffled += 1
        else:
            out.append(fresh)
        if held is not None:
            out.append(replace(held, at=fresh.at, late=True))
        with_copies: list[Delivery] = []
        for d in out:
            with_copies.append(d)
            if rng.random() < self.config.duplicate_prob:
                with_copies.append(replace(d, duplicate=True))
                self.duplicated += 1
        return with_copies
