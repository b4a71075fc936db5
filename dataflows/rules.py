"""The few settings the per-robot logic needs, as one small frozen Struct.

The pure logic (``dataflows.robot``, ``dataflows.windows``) takes a :class:`Rules`
rather than the whole :class:`~fleetpulse.settings.Settings`, so tests can state
exactly the thresholds they exercise and the Bytewax wiring passes one object down.
:class:`LiveRules` is where the config watcher (``fleetpulse.reload``) puts new ones.
"""

from __future__ import annotations

import math

import msgspec

from fleetpulse.alert_rules import RuleBook
from fleetpulse.errors import ConfigError
from fleetpulse.settings import Settings

__all__ = ["LiveRules", "Rules"]


class Rules(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Thresholds and timings of the per-robot state machine and its windows."""

    offline_after_s: float  # arrival time without a report before "offline"
    low_battery_pct: float  # low_battery fires at or below this level
    battery_ok_pct: float  # a low robot clears at or above this level (hysteresis)
    window_s: int  # event-time tumbling window length, seconds (epoch-aligned)
    allowed_lateness_s: float  # how far (event time) the watermark trails the newest report
    max_future_s: float = 300.0  # a ts further ahead of its arrival is a dead letter `future`
    max_age_s: float = 604_800.0  # a ts further behind its arrival is a dead letter `past`
    stuck_after: int = 10  # stale reports in a row that make a robot "stuck"
    # Arrival time without a report after which a robot is forgotten (0: never).
    retire_after_s: float = 0.0
    # New robots a shard takes (0: no limit); FLEETPULSE_MAX_ROBOTS spread over the shards.
    max_robots_per_shard: int = 0
    book: RuleBook = RuleBook()  # the alert rules (FLEETPULSE_RULES_FILE)

    def __post_init__(self) -> None:
        # Settings bounds each value alone; the pairs below only make sense together.
        if self.battery_ok_pct <= self.low_battery_pct:
            # With ok <= low a level between (or equal to) both would raise and clear on
            # every report: the hysteresis would flap instead of damping.
            raise ConfigError(
                f"battery_ok_pct ({self.battery_ok_pct:g}) must be above low_battery_pct "
                f"({self.low_battery_pct:g}); set FLEETPULSE_BATTERY_OK_PCT higher than "
                "FLEETPULSE_LOW_BATTERY_PCT"
            )
        if (
            self.offline_after_s <= 0
            or not 1 <= self.window_s <= 86_400  # as FLEETPULSE_WINDOW_S allows
            # Infinite lateness would put every window's close at infinity, which no
            # timer can hold (and NaN passes every comparison above and below).
            or not 0 <= self.allowed_lateness_s < math.inf
            or self.max_future_s < 0
            or self.max_age_s <= 0
            or self.stuck_after < 1
            or self.max_robots_per_shard < 0
        ):
            raise ConfigError(
                "offline_after_s, max_age_s must be > 0, window_s 1-86400, stuck_after >= 1, "
                "allowed_lateness_s (finite), max_future_s >= 0; got "
                f"{self.offline_after_s:g}, {self.max_age_s:g}, {self.window_s}, "
                f"{self.stuck_after}, {self.allowed_lateness_s:g}, {self.max_future_s:g}"
            )
        if self.retire_after_s and not self.offline_after_s < self.retire_after_s < math.inf:
            # A robot is offline before it is forgotten, so its last state was seen.
            raise ConfigError(
                f"retire_after_s ({self.retire_after_s:g}) must be 0 (never) or above "
                f"offline_after_s ({self.offline_after_s:g}); set FLEETPULSE_RETIRE_AFTER_S "
                "higher than FLEETPULSE_OFFLINE_AFTER_S"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        """The rules a dataflow built from ``settings`` runs with (raises ConfigError)."""
        return cls(
            offline_after_s=settings.offline_after_s,
            low_battery_pct=settings.low_battery_pct,
            battery_ok_pct=settings.battery_ok_pct,
            window_s=settings.window_s,
            allowed_lateness_s=settings.allowed_lateness_s,
            max_future_s=settings.max_future_s,
            max_age_s=settings.max_age_s,
            stuck_after=settings.stuck_after,
            retire_after_s=settings.retire_after_s,
            # Each shard's share, rounded up: the fleet holds at most max_robots rounded
            # up to a multiple of the shard count.
            max_robots_per_shard=-(-settings.max_robots // settings.shards),
        )


class LiveRules:
    """The rules every shard of one process runs with, replaced whole on a hot reload.

    The config watcher's thread assigns :attr:`current` (one reference: a reader sees
    the old rules or the new ones, never a mix); a shard reads it once at the start of
    each batch, so one batch runs under one set of rules.
    """

    __slots__ = ("current",)

    def __init__(self, rules: Rules) -> None:
        self.current = rules
