"""Keying raw Kafka messages by their robot's shard without decoding them."""

from __future__ import annotations

from datetime import UTC, datetime

from dataflows.records import DLQ_KEY, Control, DeadLetter
from dataflows.shard import shard_key
from dataflows.source import Binding, SourcePosition, key_message
from fleetpulse.control import CONTROL_HEADER, encode_control, reset_order

TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SHARDS = 64


def test_a_robot_key_keeps_the_raw_value_and_the_trace_context() -> None:
    keyed = key_message(
        b"amr-7", b'{"x":1}', [("ingest_ms", b"1"), ("traceparent", TP)], 3, 42, 1700, SHARDS
    )
    assert keyed == (shard_key("amr-7", SHARDS), ("amr-7", b'{"x":1}', TP.decode(), 3, 42, 1700))


def test_missing_headers_give_an_empty_trace_context() -> None:
    assert key_message(b"amr-7", b"v", None, 0, 0, 0, SHARDS)[1] == ("amr-7", b"v", "", 0, 0, 0)


def test_a_robot_always_lands_in_the_same_shard() -> None:
    keys = {key_message(b"amr-7", b"v", None, p, p, p, SHARDS)[0] for p in range(12)}
    assert keys == {shard_key("amr-7", SHARDS)}
    spread = {shard_key(f"amr-{i}", SHARDS) for i in range(2000)}
    assert len(spread) == SHARDS  # every shard gets robots


def test_keys_that_are_not_robot_ids_become_dead_letters_with_their_origin() -> None:
    for key in (None, b"", b"bad key", b"\xff\xfe", b"!dlq", b"a" * 65, "amr-ü".encode()):
        robot, item = key_message(key, b"v", [], 5, 9, 0, SHARDS)
        assert robot == DLQ_KEY
        assert item == DeadLetter(key, b"v", "key", "message key is not a robot id", 5, 9)


def test_a_key_with_a_trailing_newline_is_not_a_robot_id() -> None:
    # Regression: the id pattern's `$` matched before a final newline, so b"amr-1\n"
    # was keyed as a robot (a second robot beside "amr-1", and a key no API can name).
    for key in (b"amr-1\n", b"amr-1\r\n", b"amr-1\nx", b"\namr-1"):
        robot, item = key_message(key, b"v", [], 2, 7, 0, SHARDS)
        assert robot == DLQ_KEY, key
        assert isinstance(item, DeadLetter)
        assert (item.key, item.value, item.kind, item.partition, item.offset) == (
            key,
            b"v",
            "key",
            2,
            7,
        )


def test_a_control_record_becomes_a_control_for_the_robots_shard() -> None:
    at = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    value = encode_control(reset_order("amr-7", "0123456789ab", at))
    headers = [(CONTROL_HEADER, b"reset_order"), ("traceparent", TP)]
    keyed = key_message(b"amr-7", value, headers, 4, 11, 1_800, SHARDS)
    assert keyed == (
        shard_key("amr-7", SHARDS),
        Control("amr-7", "reset_order", "0123456789ab", 4, 11, 1_800),
    )
    # Another robot's record under this key, or a broken one: dead letters, not commands.
    other = encode_control(reset_order("amr-8", "0123456789ab", at))
    _, item = key_message(b"amr-7", other, headers, 4, 12, 0, SHARDS)
    assert isinstance(item, DeadLetter) and item.kind == "key"
    _, item = key_message(b"amr-7", b"{}", headers, 4, 13, 0, SHARDS)
    assert isinstance(item, DeadLetter) and item.kind == "invalid"


def test_a_position_names_what_it_belongs_to() -> None:
    binding = Binding("cluster-a", "robot.reports", "topic-1", 64)
    assert "topic-1" in binding.text and "64 shards" in binding.text
    other = Binding("cluster-a", "robot.reports", "topic-2", 64)
    assert SourcePosition(binding.text, 5) != SourcePosition(other.text, 5)
