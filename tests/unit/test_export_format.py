"""The export's pure parts: cursors, time ranges, CSV/NDJSON rows, the CLI's row splitter."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from api.export import csv_columns, csv_rows, ndjson_rows
from api.export_cli import Records
from fleetpulse.errors import InvalidQuery
from fleetpulse.schema import Alert, Pose, RobotReport, WindowStats
from state.export import KINDS, Range, Row, parse_cursor, time_range

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_csv_columns_flatten_nested_structs_in_field_order() -> None:
    assert [".".join(c) for c in csv_columns(RobotReport)] == [
        "robot_id", "boot", "seq", "ts", "status", "battery", "pose.x", "pose.y",
        "pose.theta", "speed", "errors", "site",
    ]  # fmt: skip
    assert [c[0] for c in csv_columns(Alert)] == [
        "id", "robot_id", "kind", "boot", "seq", "at", "detail",
    ]  # fmt: skip
    assert ("part",) in csv_columns(WindowStats)


def test_csv_rows_quote_per_rfc_4180_and_read_back() -> None:
    report = RobotReport(
        robot_id="amr-1", seq=3, ts=T0, status="error", battery=12.5,
        pose=Pose(x=1.0, y=-2.5, theta=0.25), errors=['E1, "hot"', "E2\r\nnext"], site=None,
    )  # fmt: skip
    encode = csv_rows(csv_columns(RobotReport))
    text = encode(None) + encode([Row("amr-1", "history/amr-1/0/3", msgspec.json.encode(report))])
    assert text.endswith(b"\r\n") and text.count(b'"E1, ""hot"";E2\r\nnext"') == 1
    (row,) = csv.DictReader(io.StringIO(text.decode(), newline=""))
    assert row == {
        "robot_id": "amr-1", "boot": "0", "seq": "3", "ts": "2025-06-01T12:00:00Z",
        "status": "error", "battery": "12.5", "pose.x": "1.0", "pose.y": "-2.5",
        "pose.theta": "0.25", "speed": "0.0", "errors": 'E1, "hot";E2\r\nnext', "site": "",
        "cursor": "history/amr-1/0/3",
    }  # fmt: skip


def test_ndjson_rows_are_the_stored_json_with_the_cursor_first() -> None:
    raw = b'{"robot_id":"amr-1","x":1}'
    rows = [Row("amr-1", "history/amr-1/0/1", raw)]
    assert ndjson_rows(True)(rows) == b'{"cursor":"history/amr-1/0/1","robot_id":"amr-1","x":1}\n'
    # A kind whose items lack the robot id gets it beside the cursor.
    assert ndjson_rows(False)([Row("r", "k/r/1/a", b'{"x":1}')]) == (
        b'{"cursor":"k/r/1/a","robot_id":"r","x":1}\n'
    )
    assert ndjson_rows(True)(None) == b""


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("history", "history/amr-1/0"),
        ("history", "stats/amr-1/0/1"),
        ("history", "history/amr-1/x/1"),
        ("history", "history/-bad/0/1"),
        ("stats", "stats/amr-1/12.5/w"),
        ("alerts", ""),
    ],
)
def test_a_malformed_cursor_is_named(kind: str, text: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        parse_cursor(kind, text)
    assert caught.value.parameter == "cursor"


def test_cursors_parse_to_the_row_they_name() -> None:
    c = parse_cursor("history", "history/amr-1/2/17")
    assert (c.robot_id, c.mark.boot, c.mark.seq) == ("amr-1", 2, 17)  # type: ignore[union-attr]
    a = parse_cursor("alerts", "alerts/amr-1/1748779203000000/amr-1:error:0:3/x")
    assert a.mark.member == b"amr-1:error:0:3/x"  # type: ignore[union-attr]
    assert set(KINDS) == {"history", "stats", "alerts", "incidents"}


def test_time_range_is_half_open_and_checked() -> None:
    r = time_range(T0, T0 + timedelta(seconds=1))
    assert r.holds(r.since_us) and not r.holds(r.until_us)  # type: ignore[arg-type]
    assert time_range(None, None) == Range(None, None)
    east = T0.astimezone(timezone(timedelta(hours=2)))
    assert time_range(east, None) == time_range(T0, None)
    for since, until, name in [
        (T0, T0, "until"),
        (T0, T0 - timedelta(1), "until"),
        (T0.replace(tzinfo=None), None, "since"),
        (None, T0.replace(tzinfo=None), "until"),
    ]:
        with pytest.raises(InvalidQuery) as caught:
            time_range(since, until)
        assert caught.value.parameter == name


def test_records_split_only_whole_rows() -> None:
    rec = Records("csv")
    assert rec.feed(b'a,b,cursor\r\n1,"x\r\n') == []
    assert rec.header == b"a,b,cursor\r\n"
    assert rec.feed(b'y""z",c/1\r\n2,') == [(b'1,"x\r\ny""z",c/1\r\n', "c/1")]
    assert rec.pending == 2
    rec.restart()  # a new answer: its header row again, then rows
    assert rec.feed(b"a,b,cursor\r\n3,4,c/2\r\n") == [(b"3,4,c/2\r\n", "c/2")]
    nd = Records("ndjson")
    assert nd.feed(b'{"cursor":"h/a/0/1","x":"\\n"}\n{"cur') == [
        (b'{"cursor":"h/a/0/1","x":"\\n"}\n', "h/a/0/1")
    ]
    assert nd.pending == len(b'{"cur')
