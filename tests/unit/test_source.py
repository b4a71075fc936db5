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
