"""The key schema and the change-event wire format, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from redis.crc import key_slot

from fleetpulse.schema import Alert, LiveState, Pose, RobotReport, encode
from state import AlertRaised, Keys, StateChanged, decode_change, scripts
from state.keys import epoch_us, from_epoch_us
from state.writer import STATE_CHANGE

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_keys_carry_the_prefix_and_a_hash_tag_per_robot() -> None:
    keys = Keys("fp")
    assert keys.robot("amr-7") == "fp:robot:{amr-7}"
    assert keys.history("amr-7") == "fp:hist:{amr-7}"
    assert keys.windows("amr-7") == "fp:win:{amr-7}"
    assert keys.status_index("idle") == "fp:idx:status:idle"
    assert keys.site_index("dock.7") == "fp:idx:site:dock.7"
    assert (keys.online_index(True), keys.online_index(False)) == (
        "fp:idx:online",
        "fp:idx:offline",
    )
    assert keys.alerts_of_kind("estop") == "fp:stream:alerts:estop"
    assert Keys("t1").pattern() == "t1:*"


@pytest.mark.parametrize("robot_id", ["amr-7", "X:12", "b_3.1"])
def test_per_robot_keys_share_one_cluster_slot(robot_id: str) -> None:
    keys = Keys("fp")
    names = [
        keys.robot(robot_id),
        keys.history(robot_id),
        keys.windows(robot_id),
        keys.window_index(robot_id),
        keys.robot_alerts(robot_id),
        keys.robot_alert_index(robot_id),
    ]
    assert {key_slot(n.encode()) for n in names} == {key_slot(robot_id.encode())}


def test_epoch_us_is_exact_and_refuses_naive_datetimes() -> None:
    dt = datetime(2025, 6, 1, 14, 0, 0, 123457, tzinfo=timezone(timedelta(hours=2)))
    assert epoch_us(dt) == 1_748_779_200_123_457
    assert from_epoch_us(epoch_us(dt)) == dt
    with pytest.raises(ValueError, match="timezone"):
        epoch_us(datetime(2025, 6, 1))


def test_change_payloads_built_by_wrapping_are_the_tagged_structs() -> None:
    # The writer (states) and the alerts script wrap these prefixes around the stored
    # JSON instead of encoding the event again; it must be what msgspec makes of it.
    report = RobotReport(
        robot_id="amr-7", seq=3, ts=T0, status="idle", battery=50.0, pose=Pose(1, 2, 0)
    )
    state = LiveState(report=report, last_seen=1.0, online=True, status_since=T0)
    alert = Alert(id="x", robot_id="amr-7", kind="estop", boot=0, seq=3, at=T0)
    state_prefix, alert_prefix = b'{"type":"state","state":', b'{"type":"alert","alert":'
    assert state_prefix == STATE_CHANGE
    assert alert_prefix.decode() in scripts.ALERTS
    assert encode(StateChanged(state=state)) == state_prefix + encode(state) + b"}"
    assert encode(AlertRaised(alert=alert)) == alert_prefix + encode(alert) + b"}"
    assert decode_change(state_prefix + encode(state) + b"}") == StateChanged(state=state)
