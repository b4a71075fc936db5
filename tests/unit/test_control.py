"""The control record format the ingest server writes and the dataflow reads."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from fleetpulse.control import (
    CONTROL_HEADER,
    RESET_ORDER,
    control_kind,
    decode_control,
    encode_control,
    reset_order,
)


def test_a_reset_order_round_trips_as_the_documented_json() -> None:
    at = datetime(2026, 11, 30, 10, 43, 55, 123000, timezone(timedelta(hours=1)))
    control = reset_order("amr-7", "0123456789ab", at)
    value = encode_control(control)
    assert json.loads(value) == {
        "control": "reset_order",
        "robot_id": "amr-7",
        "by": "0123456789ab",
        "requested_at": "2026-11-30T09:43:55.123000Z",
    }
    assert decode_control(value) == control
    assert decode_control(value).requested_at.tzinfo == UTC


@pytest.mark.parametrize(
    "change",
    [
        {"control": "reboot"},
        {"robot_id": "amr-1\n"},
        {"by": "the-admin"},
        {"requested_at": "2026-11-30T09:43:55"},
        {"extra": 1},
    ],
)
def test_a_value_off_the_format_is_refused(change: dict[str, object]) -> None:
    good = json.loads(encode_control(reset_order("amr-7", "0123456789ab")))
    with pytest.raises(msgspec.ValidationError):
        decode_control(json.dumps({**good, **change}))


def test_the_header_tells_a_control_record_from_a_report() -> None:
    assert control_kind([("traceparent", b"00-x"), (CONTROL_HEADER, RESET_ORDER)]) == RESET_ORDER
    assert control_kind({CONTROL_HEADER: "reset_order"}) == b"reset_order"
    assert control_kind([("traceparent", b"00-x"), ("ingest_ms", b"1")]) is None
    assert control_kind(None) is None
