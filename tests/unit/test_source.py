"""Keying raw Kafka messages by robot without decoding them."""

from __future__ import annotations

from dataflows.records import DLQ_KEY, DeadLetter
from dataflows.source import key_message

TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_robot_key_keeps_the_raw_value_and_the_trace_context() -> None:
    keyed = key_message(
        b"amr-7", b'{"x":1}', [("ingest_ms", b"1"), ("traceparent", TP)], 3, 42, 1700
    )
    assert keyed == ("amr-7", ("amr-7", b'{"x":1}', TP.decode(), 3, 42, 1700))


def test_missing_headers_give_an_empty_trace_context() -> None:
    assert key_message(b"amr-7", b"v", None, 0, 0, 0)[1] == ("amr-7", b"v", "", 0, 0, 0)


def test_keys_that_are_not_robot_ids_become_dead_letters_with_their_origin() -> None:
    for key in (None, b"", b"bad key", b"\xff\xfe", b"!dlq", b"a" * 65, "amr-ü".encode()):
        robot, item = key_message(key, b"v", [], 5, 9, 0)
        assert robot == DLQ_KEY
        assert item == DeadLetter(key, b"v", "message key is not a robot id", 5, 9)


def test_a_key_with_a_trailing_newline_is_not_a_robot_id() -> None:
    # Regression: the id pattern's `$` matched before a final newline, so b"amr-1\n"
    # was keyed as a robot (a second robot beside "amr-1", and a key no API can name).
    for key in (b"amr-1\n", b"amr-1\r\n", b"amr-1\nx", b"\namr-1"):
        robot, item = key_message(key, b"v", [], 2, 7, 0)
        assert robot == DLQ_KEY, key
        assert isinstance(item, DeadLetter)
        assert (item.key, item.value, item.kind, item.partition, item.offset) == (
            key,
            b"v",
            "key",
            2,
            7,
        )
