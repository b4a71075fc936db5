"""The Redis key schema: the only place in fleetpulse that names a key.

Every key starts with ``settings.redis_prefix`` (``P`` below, ``fp`` by default).
Per-robot keys carry the robot id as a hash tag (``{amr-7}``), so all keys of one
robot share a Redis Cluster slot; global keys do not.

Per robot (``r`` = robot id, one slot per robot)::

    P:robot:{r}    HASH    gen, boot, seq, t (the state's version, state.writer.version),
                           online (1/0), status, site ('' = none), battery, low (1/0),
                           state (LiveState JSON) — the conditional upsert reads the
                           version and the old index buckets from here. A retired
                           robot's hash holds only ``gone`` (the retirement's arrival
                           ms) for RETIRED_TTL_S: a tombstone that replayed writes from
                           before it are checked against
    P:hist:{r}     LIST    applied RobotReport JSON, newest first, capped at history_len
    P:win:{r}      HASH    window name -> WindowStats JSON; the name is the start (µs
                           since epoch), "<start>:<part>" for a reopened minute
                           (window_name)
    P:wins:{r}     ZSET    window names scored by start µs, capped at WINDOWS_PER_ROBOT;
                           the order behind stats(since=...)
    P:alert:{r}    HASH    alert id -> Alert JSON; a present field is the dedupe marker
    P:alerts:{r}   ZSET    alert ids scored by event time (µs), capped at ALERTS_PER_ROBOT
    P:inc:{r}      HASH    incident id -> Incident JSON (its newest version)
    P:incv:{r}     HASH    incident id -> rank of that version (2 x closed + acknowledged)
    P:incs:{r}     ZSET    incident ids scored by opened_at (µs), capped at ALERTS_PER_ROBOT

Global (one key each, or one per status / site / alert kind)::

    P:idx:all            ZSET  every robot id, score 0 (ZRANGEBYLEX paging)
    P:idx:status:<s>     ZSET  robot ids whose status is <s>, score 0
    P:idx:site:<site>    ZSET  robot ids of a site, score 0 (robots without a site: none)
    P:idx:online         ZSET  robot ids online, score 0
    P:idx:offline        ZSET  robot ids offline, score 0
    P:idx:battery        ZSET  robot ids scored by battery % (battery_lt)
    P:summary            HASH  counters: total, online, low, status:<s>, site:<site>,
                               site_status:<s>:<site>; a counter at 0 is deleted
    P:stream:alerts      STREAM new alerts (field data = Alert JSON), MAXLEN ~ alerts_len
    P:stream:alerts:<k>  STREAM the same, one per alert kind (bounded kind queries)
    P:idx:incidents:open ZSET  ids of the open incidents, scored by opened_at (µs)
    P:idx:incidents      ZSET  ids of every incident, scored by opened_at (µs), the
                               newest alerts_len kept
    P:stream:changes     STREAM state changes, new alerts, incident versions and
                               retirements (field data =
                               ChangeEvent JSON), MAXLEN ~ changes_len; its ids are the
                               SSE event ids

Scores that hold times are integer microseconds since the Unix epoch (exact in a
double up to year 2255), see :func:`epoch_us`.

Redis Cluster: each batch script touches many robots *and* the global keys, and the
global key names for old buckets (``P:idx:status:<old>``) are built inside the
script from prefixes passed in ARGV, so the scripts run as-is on a single node or a
Sentinel group only. On a cluster the writer would (1) group a batch by slot and run
the per-robot part once per slot with only that slot's KEYS, returning the bucket
transitions it applied (old -> new status/site/online/low), then (2) apply those
transitions to the global keys, which would get one shared hash tag (``P:{g}:...``)
so they live in one slot. Step 2 must be made idempotent on its own (e.g. a per-slot
outbox stream of transitions consumed with a stored last id), because a crash between
(1) and (2) would otherwise lose a summary update that the replay no longer repeats.
Readers need no change: per-robot reads stay single-slot, index reads single-key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = [
    "ALERTS_PER_ROBOT",
    "RETIRED_TTL_S",
    "WINDOWS_PER_ROBOT",
    "Keys",
    "epoch_us",
    "from_epoch_us",
    "window_name",
]

# Retention of the per-robot window and alert sets. Fixed here rather than in
# Settings (which this module does not own); a day of 1-minute windows.
WINDOWS_PER_ROBOT = 1440
ALERTS_PER_ROBOT = 1000
# How long a retired robot's tombstone stays: longer than any replay of the dataflow
# from its last checkpoint (a replay from further back replays the retirement too).
RETIRED_TTL_S = 86_400

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def epoch_us(dt: datetime) -> int:
    """Integer microseconds since the Unix epoch; exact, unlike ``dt.timestamp()``.

    Raises ``ValueError`` for a naive datetime (its instant would depend on the host).
    """
    if dt.tzinfo is None:
        raise ValueError(f"{dt.isoformat()} has no timezone; pass an aware datetime")
    return (dt - _EPOCH) // _US


def window_name(start_us: int, part: int) -> str:
    """A window's field/member name: its start, plus ``:part`` for a reopened minute."""
    return str(start_us) if part == 0 else f"{start_us}:{part}"


def from_epoch_us(us: int) -> datetime:
    """The UTC datetime of :func:`epoch_us` microseconds."""
    return _EPOCH + us * _US


class Keys:
    """Every key name for one prefix; build once per writer/reader and reuse."""

    __slots__ = (
        "alerts",
        "all",
        "battery",
        "changes",
        "incidents",
        "offline",
        "online",
        "open_incidents",
        "prefix",
        "published",
        "republish",
        "site_prefix",
        "status_prefix",
        "summary",
    )

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.summary = f"{prefix}:summary"
        self.all = f"{prefix}:idx:all"
        self.online = f"{prefix}:idx:online"
        self.offline = f"{prefix}:idx:offline"
        self.battery = f"{prefix}:idx:battery"
        # Prefixes (not keys): the state script appends the old/new bucket name.
        self.status_prefix = f"{prefix}:idx:status:"
        self.site_prefix = f"{prefix}:idx:site:"
        self.alerts = f"{prefix}:stream:alerts"
        self.changes = f"{prefix}:stream:changes"
        self.incidents = f"{prefix}:idx:incidents"
        self.open_incidents = f"{prefix}:idx:incidents:open"
        # The projection's own bookkeeping (state.projection): the server the live state
        # was last fully published to, and the re-publish under way.
        self.published = f"{prefix}:meta:published"
        self.republish = f"{prefix}:meta:republish"

    # --- per robot (hash-tagged) ------------------------------------------------------
    def robot(self, robot_id: str) -> str:
        """HASH with the live state and the fields the conditions and indexes need."""
        return f"{self.prefix}:robot:{{{robot_id}}}"

    def history(self, robot_id: str) -> str:
        """LIST of applied reports, newest first."""
        return f"{self.prefix}:hist:{{{robot_id}}}"

    def windows(self, robot_id: str) -> str:
        """HASH window start µs -> WindowStats JSON."""
        return f"{self.prefix}:win:{{{robot_id}}}"

    def window_index(self, robot_id: str) -> str:
        """ZSET of window starts (µs)."""
        return f"{self.prefix}:wins:{{{robot_id}}}"

    def robot_alerts(self, robot_id: str) -> str:
        """HASH alert id -> Alert JSON (also the dedupe marker)."""
        return f"{self.prefix}:alert:{{{robot_id}}}"

    def robot_alert_index(self, robot_id: str) -> str:
        """ZSET of alert ids scored by event time (µs)."""
        return f"{self.prefix}:alerts:{{{robot_id}}}"

    def robot_incidents(self, robot_id: str) -> str:
        """HASH incident id -> Incident JSON."""
        return f"{self.prefix}:inc:{{{robot_id}}}"

    def robot_incident_ranks(self, robot_id: str) -> str:
        """HASH incident id -> rank of the stored version."""
        return f"{self.prefix}:incv:{{{robot_id}}}"

    def robot_incident_index(self, robot_id: str) -> str:
        """ZSET of incident ids scored by opened_at (µs)."""
        return f"{self.prefix}:incs:{{{robot_id}}}"

    # --- global -----------------------------------------------------------------------
    def status_index(self, status: str) -> str:
        """ZSET (score 0) of robot ids with this status."""
        return self.status_prefix + status

    def site_index(self, site: str) -> str:
        """ZSET (score 0) of robot ids at this site."""
        return self.site_prefix + site

    def online_index(self, online: bool) -> str:
        """ZSET (score 0) of robot ids that are online (or offline)."""
        return self.online if online else self.offline

    def alerts_of_kind(self, kind: str) -> str:
        """STREAM of new alerts of one kind."""
        return f"{self.alerts}:{kind}"

    def republished_shards(self, token: str) -> str:
        """SET of the dataflow's shard keys whose live state re-publish ``token`` wrote."""
        return f"{self.republish}:{token}"

    def pattern(self) -> str:
        """A SCAN MATCH pattern for every key under this prefix (tests, operations)."""
        return f"{self.prefix}:*"
