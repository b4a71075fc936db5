"""A raw Kafka message becomes a report, or a dead letter of the kind that says why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from dataflows.classify import classify
from dataflows.records import DeadLetter, Raw
from dataflows.rules import Rules
from fleetpulse.errors import ConfigError
from fleetpulse.schema import Pose, RobotReport

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T0_MS = 1_704_067_200_000
RULES = Rules(
    offline_after_s=30.0,
    low_battery_pct=20.0,
    battery_ok_pct=25.0,
    window_s=60,
    allowed_lateness_s=10.0,
    max_future_s=300.0,
    max_age_s=3600.0,
)


def body(**change: Any) -> dict[str, Any]:
    """A valid report as the wire carries it, with ``change`` applied."""
    return {
        "robot_id": "amr-1",
        "boot": 2,
        "seq": 7,
        "ts": T0.isoformat(),
        "status": "moving",
        "battery": 55.5,
        "pose": {"x": 1.0, "y": -2.0, "theta": 0.5},
        **change,
    }


def raw(value: bytes | None, *, key: str = "amr-1", arrival_ms: int = T0_MS) -> Raw:
    return (key, value, "", 4, 1234, arrival_ms)


def encoded(**change: Any) -> bytes:
    return msgspec.json.encode(body(**change))


def dead(item: RobotReport | DeadLetter) -> DeadLetter:
    assert isinstance(item, DeadLetter), item
    return item


def test_a_valid_message_becomes_its_report() -> None:
    report = classify(raw(encoded()), RULES)
    assert report == RobotReport(
        robot_id="amr-1",
        boot=2,
        seq=7,
        ts=T0,
        status="moving",
        battery=55.5,
        pose=Pose(x=1.0, y=-2.0, theta=0.5),
    )


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"not json",
        b"[]",
        encoded(battery=100.5),
        encoded(speed=-1.0),
        encoded(seq=2**53 + 1),
        encoded(extra=1),  # unknown fields are refused
        encoded(ts="2024-01-01T00:00:00"),  # no offset
        encoded(errors=["x" * 65]),
        encoded(pose={"x": 1e10, "y": 0.0, "theta": 0.0}),
        encoded(pose={"x": 0.0, "y": 0.0, "theta": 0.0, "z": 1.0}),
        encoded().replace(b"55.5", b"1e999"),  # JSON has no NaN, but 1e999 reads as inf
    ],
)
def test_a_malformed_report_is_invalid_with_its_origin(value: bytes | None) -> None:
    letter = dead(classify(raw(value), RULES))
    assert (letter.kind, letter.key, letter.value) == ("invalid", b"amr-1", value)
    assert (letter.partition, letter.offset) == (4, 1234)
    assert letter.reason.startswith("invalid report: ")


def test_a_key_that_is_not_the_reports_robot_is_refused() -> None:
    letter = dead(classify(raw(encoded(), key="amr-2"), RULES))
    assert (letter.kind, letter.key, letter.partition, letter.offset) == ("key", b"amr-2", 4, 1234)
    assert "'amr-2'" in letter.reason and "'amr-1'" in letter.reason


def test_ts_bounds_are_measured_from_the_kafka_append_time() -> None:
    # Inclusive bounds: exactly max_future_s ahead and max_age_s behind still pass.
    assert isinstance(classify(raw(encoded(), arrival_ms=T0_MS - 300_000), RULES), RobotReport)
    assert isinstance(classify(raw(encoded(), arrival_ms=T0_MS + 3_600_000), RULES), RobotReport)
    future = dead(classify(raw(encoded(), arrival_ms=T0_MS - 300_001), RULES))
    past = dead(classify(raw(encoded(), arrival_ms=T0_MS + 3_600_001), RULES))
    assert (future.kind, past.kind) == ("future", "past")
    assert "ahead of its Kafka append time" in future.reason
    assert "behind its Kafka append time" in past.reason
    assert "FLEETPULSE_MAX_FUTURE_S=300" in future.reason
    assert (past.partition, past.offset, past.value) == (4, 1234, encoded())


def test_the_same_instant_with_another_utc_offset_is_the_same_time() -> None:
    plus14 = (T0 + timedelta(seconds=300)).astimezone(timezone(timedelta(hours=14))).isoformat()
    assert plus14 == "2024-01-01T14:05:00+14:00"
    report = classify(raw(encoded(ts=plus14)), RULES)
    assert isinstance(report, RobotReport)
    assert report.ts == T0 + timedelta(seconds=300)
    written = (T0 + timedelta(seconds=301)).isoformat().replace("+00:00", "-23:59")
    # 23:59 behind UTC is nearly a day later as an instant: too far ahead.
    assert dead(classify(raw(encoded(ts=written)), RULES)).kind == "future"


def test_a_window_beyond_year_9999_is_refused_as_future() -> None:
    # The arrival clock at the very end of the datetime range (a bad broker clock):
    # the report's window would end at 10000-01-01, which no WindowStats can hold.
    end_ms = (datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC) - T0) // timedelta(
        milliseconds=1
    ) + T0_MS
    last_minute = "9999-12-31T23:59:30+00:00"
    letter = dead(classify(raw(encoded(ts=last_minute), arrival_ms=end_ms), RULES))
    assert letter.kind == "future"
    assert "outside years 1-9999" in letter.reason
    # Year 9999 local time, year 10000 in UTC.
    behind = "9999-12-31T22:00:00-05:00"
    assert dead(classify(raw(encoded(ts=behind), arrival_ms=end_ms), RULES)).kind == "future"
    ok = "9999-12-31T23:58:59+00:00"
    assert isinstance(classify(raw(encoded(ts=ok), arrival_ms=end_ms), RULES), RobotReport)


def test_windows_longer_than_a_day_are_refused_by_the_rules() -> None:
    # FLEETPULSE_WINDOW_S is at most a day; a window of ~30 million years never reaches
    # classify (it would hold nothing any datetime can carry).
    with pytest.raises(ConfigError, match="window_s"):
        msgspec.structs.replace(RULES, window_s=10**15)


def test_a_window_before_year_1_is_refused_as_past() -> None:
    # Only reachable with rules no settings allow (a max age of ~2000 years): the
    # window of 0001-01-01T00:00:03 with 7 s windows starts before year 1.
    ancient = msgspec.structs.replace(RULES, window_s=7, max_age_s=1e11)
    first = "0001-01-01T00:00:03+00:00"
    assert dead(classify(raw(encoded(ts=first)), ancient)).kind == "past"
    assert isinstance(classify(raw(encoded(ts="0001-01-01T00:00:04+00:00")), ancient), RobotReport)
