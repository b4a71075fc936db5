"""The SSE messages the event stream builds, without Redis or a server."""

from __future__ import annotations

import json

from api.stream import RESET_REASON, frame, reset_frame


def test_a_reset_is_one_message_whose_id_is_where_the_stream_goes_on() -> None:
    out = reset_frame((1700000000000, 3), "1700000009999-1")
    head, data = out.split(b"data: ")
    assert head == b"id: 1700000009999-1\nevent: reset\n"
    assert data.endswith(b"\n\n") and data.count(b"\n") == 2  # one data line, then the end
    assert json.loads(data) == {
        "type": "reset",
        "reason": RESET_REASON,
        "requested": "1700000000000-3",
        "resume": "1700000009999-1",
    }
    assert "reload" in RESET_REASON


def test_a_change_frame_carries_its_id_kind_and_payload() -> None:
    assert frame("5-1", b'{"type":"alert","x":1}') == (
        b'id: 5-1\nevent: alert\ndata: {"type":"alert","x":1}\n\n'
    )
