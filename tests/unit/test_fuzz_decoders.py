"""Hypothesis over every decoder untrusted bytes meet (issue 17): the report decoder and
the batch parser of ingest (both the fast single-post path and Litestar's), the
control-record decoder and the dataflow's ``classify``.

Inputs are arbitrary bytes and, structure-aware, valid reports mutated the ways a
broken or hostile client would: a field dropped, retyped or unknown, numbers huge or
not numbers (NaN, Infinity), deep nesting, huge strings, odd unicode, duplicate keys,
trailing garbage. Properties:

- nothing raises but the documented errors (``msgspec.ValidationError``/``DecodeError``;
  ``classify`` never raises: bad data is a dead letter);
- what is accepted keeps the contract (ranges, patterns, lengths, a zoned ``ts``, checked
  here independently of msgspec) and re-encodes to bytes that decode to an equal value;
- a batch is accepted exactly when each of its items is;
- the fast path and Litestar's route answer the same body the same way.

Fixed example counts, derandomized: the same cases every run, a few seconds in all.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar.testing import TestClient

from api.app import create_app
from api.auth import hash_token, new_token
from dataflows.classify import classify
from dataflows.records import DeadLetter
from fleetpulse.control import Control, decode_control, encode_control
from fleetpulse.schema import STATUSES, RobotReport, decode_report, decode_reports, encode
from fleetpulse.settings import Settings
from tests.unit.test_shard import RULES  # the shard tests' thresholds

DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError)


def fuzzed(examples: int) -> Any:
    """``examples`` cases, the same ones every run."""
    return hsettings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- valid reports and their mutations ------------------------------------------------

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
COUNT = st.integers(0, 2**53)


def _finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def reports(draw: st.DrawFn) -> dict[str, Any]:
    """A valid report as a client writes it: optional fields sometimes left out, an
    integer sometimes with a zero fraction (JSON Schema's `integer` admits 7.0)."""
    ts = draw(st.datetimes(NOW - timedelta(days=6), NOW + timedelta(minutes=4)))
    offset = draw(st.sampled_from([UTC, *(timezone(timedelta(hours=h)) for h in (-8, 5, 14))]))
    out: dict[str, Any] = {
        "robot_id": draw(ID),
        "seq": draw(COUNT),
        "ts": ts.replace(tzinfo=UTC).astimezone(offset).isoformat(),
        "status": draw(st.sampled_from(STATUSES)),
        "battery": draw(_finite(0, 100)),
        "pose": {
            "x": draw(_finite(-1e9, 1e9)),
            "y": draw(_finite(-1e9, 1e9)),
            "theta": draw(_finite(-1e6, 1e6)),
        },
    }
    optional = {
        "boot": COUNT,
        "speed": _finite(0, 1000),
        "errors": st.lists(st.text(max_size=64), max_size=16),
        "site": ID | st.none(),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            out[name] = draw(values)
    for name in ("boot", "seq"):
        if name in out and out[name] < 2**53 and draw(st.booleans()):
            out[name] = float(out[name])  # 7.0
    return out


ODD_VALUES = st.sampled_from(
    [
        None,
        True,
        "",
        "x" * 100_000,
        "\ud800",  # a lone surrogate
        "amr-1\n",
        "é" * 65,
        0,
        -1,
        2**53 + 1,
        2**64,
        10**400,
        1.5,
        -0.0,
        1e308,
        -1e308,
        [],
        {},
        [1, 2],
        {"x": 1},
        "2026-11-30T12:00:00",  # no offset
        "1732650000",
    ]
)
LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "0x10", "01", "1.", ".5", "+1"]


def _at(report: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = report
    for key in path[:-1]:
        node = node[key]
    return node


PATHS = [
    (name,)
    for name in ("robot_id", "boot", "seq", "ts", "status", "battery", "speed", "errors", "site")
] + [("pose",), ("pose", "x"), ("pose", "y"), ("pose", "theta")]


HOW = ["none", "drop", "retype", "unknown", "literal", "nest", "dup", "trail", "cut"]


@st.composite
def mutated(draw: st.DrawFn, whole: bool = False) -> bytes:
    """A valid report, encoded, then broken (or not) one of the ways clients break it;
    ``whole``: still one JSON value (not cut short, nothing after it), as a batch's
    items are when the array is well-formed."""
    report = draw(reports())
    how = draw(st.sampled_from(HOW[:-2] if whole else HOW))
    path = draw(st.sampled_from(PATHS))
    if how == "drop":
        _at(report, path).pop(path[-1], None)
    elif how == "retype":
        _at(report, path)[path[-1]] = draw(ODD_VALUES)
    elif how == "unknown":
        _at(report, path)[draw(st.sampled_from(["extra", "Seq", "robot_id ", "", "pose"]))] = 1
    elif how == "nest":
        depth = draw(st.sampled_from([2, 64, 1000, 100_000]))
        _at(report, path)[path[-1]] = "NEST"
        text = json.dumps(report).replace('"NEST"', "[" * depth + "]" * depth)
        return text.encode()
    text = json.dumps(report, ensure_ascii=draw(st.booleans()))
    if how == "literal":
        _at(report, path)[path[-1]] = "LITERAL"
        text = json.dumps(report).replace('"LITERAL"', draw(st.sampled_from(LITERALS)))
    elif how == "dup":  # the key twice, an odd value first: each is checked, the last counts
        key = path[0]
        text = "{" + f'"{key}": {json.dumps(draw(ODD_VALUES))}, ' + text[1:]
    elif how == "trail":
        text += draw(st.sampled_from(["x", "}", ",", " {}", "\x00", "\n\n", "[]"]))
    elif how == "cut":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text.encode("utf-8", "surrogatepass")


BODIES = st.binary(max_size=512) | mutated() | reports().map(lambda r: json.dumps(r).encode())

# -- the contract, checked without msgspec --------------------------------------------

ROBOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def in_contract(r: RobotReport) -> None:
    """Every constraint the document states, checked on an accepted report."""
    assert ROBOT_ID.fullmatch(r.robot_id), r.robot_id
    assert r.site is None or ROBOT_ID.fullmatch(r.site), r.site
    for count in (r.boot, r.seq):
        assert type(count) is int and 0 <= count <= 2**53
    assert r.status in STATUSES
    assert r.ts.tzinfo is not None and r.ts.utcoffset() is not None
    bounds = [
        (r.battery, 0, 100),
        (r.speed, 0, 1000),
        (r.pose.x, -1e9, 1e9),
        (r.pose.y, -1e9, 1e9),
        (r.pose.theta, -1e6, 1e6),
    ]
    for value, lo, hi in bounds:
        assert type(value) is float and math.isfinite(value) and lo <= value <= hi, bounds
    assert len(r.errors) <= 16 and all(type(e) is str and len(e) <= 64 for e in r.errors)


def round_trips(r: RobotReport) -> None:
    again = decode_report(encode(r))
    assert again == r
    assert encode(again) == encode(r)


# -- the report decoder and the batch parser ------------------------------------------


def test_the_report_decoder_refuses_only_with_its_errors_and_keeps_the_contract() -> None:
    seen: Counter[str] = Counter()

    @given(body=BODIES)
    @example(body=b'{"robot_id":"amr-1","seq":2298147.0,"boot":36101.0,"ts":"2026-11-30T12:00:00Z",'
             b'"status":"idle","battery":50,"pose":{"x":0,"y":0,"theta":0}}')  # fmt: skip
    @example(body=b'{"robot_id":"amr-1","seq":1e0,"ts":"2026-11-30T12:00:00Z","status":"idle",'
             b'"battery":50,"pose":{"x":0,"y":0,"theta":0}}')  # fmt: skip
    @example(body=b"[" * 100_000 + b"]" * 100_000)
    # An integral float (so the body is decoded a second time) beside a value nested
    # 100,000 deep: a first, untyped second decode raised RecursionError here.
    @example(body=b'{"robot_id":"a","seq":1.0,"errors":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    @fuzzed(400)
    def check(body: bytes) -> None:
        try:
            report = decode_report(body)
        except DECODE_ERRORS:
            seen["refused"] += 1
            return
        seen["accepted"] += 1
        in_contract(report)
        round_trips(report)

    check()
    assert seen["accepted"] >= 40 and seen["refused"] >= 80, seen


@given(report=reports())
@fuzzed(150)
def test_every_valid_report_is_accepted_as_written(report: dict[str, Any]) -> None:
    decoded = decode_report(json.dumps(report))
    in_contract(decoded)
    assert decoded.robot_id == report["robot_id"]
    assert decoded.seq == report["seq"] and decoded.boot == report.get("boot", 0)
    assert decoded.ts == datetime.fromisoformat(report["ts"])
    assert decoded.errors == report.get("errors", [])
    round_trips(decoded)


def test_a_fraction_in_an_integer_is_still_refused_and_named() -> None:
    body = b'{"robot_id":"a","seq":1.5,"ts":"2026-11-30T12:00:00Z","status":"idle",'
    body += b'"battery":5,"pose":{"x":0,"y":0,"theta":0}}'
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int`, got `float` - at `\$.seq`"):
        decode_report(body)
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\[1\].seq`"):
        decode_reports(b"[" + body.replace(b"1.5", b"1.0") + b"," + body + b"]")


def test_a_batch_is_accepted_exactly_when_each_of_its_items_is() -> None:
    seen: Counter[str] = Counter()

    @given(items=st.lists(mutated(whole=True), max_size=6))
    @example(items=[])
    @fuzzed(120)
    def check(items: list[bytes]) -> None:
        singly: list[RobotReport] | None = []
        for item in items:
            try:
                report = decode_report(item)
            except DECODE_ERRORS:
                singly = None
                break
            assert singly is not None
            singly.append(report)
        try:
            batch = decode_reports(b"[" + b",".join(items) + b"]")
        except DECODE_ERRORS:
            assert singly is None, items
            seen["refused"] += 1
            return
        seen["accepted" if batch else "empty"] += 1
        assert batch == singly
        for report in batch:
            in_contract(report)
        assert decode_reports(encode(batch)) == batch

    check()
    assert seen["accepted"] >= 10 and seen["refused"] >= 30 and seen["empty"] >= 1, seen


def test_a_repeated_key_counts_at_each_occurrence_where_a_whole_float_is_read() -> None:
    # The second decode of a body with a whole float (`"seq": 1.0`) was at first untyped,
    # where the last of a repeated key wins: a batch of that report and one whose `seq`
    # is "x" and then 3 was accepted, though the second alone is refused. The batch
    # property found it.
    good = b'{"robot_id":"a","seq":1.0,"ts":"2026-11-30T12:00:00Z","status":"idle",'
    good += b'"battery":5,"pose":{"x":0,"y":0,"theta":0}}'
    twice = good.replace(b'"seq":1.0', b'"seq":"x","seq":3')
    for body in (twice, b"[" + good + b"," + twice + b"]"):
        with pytest.raises(msgspec.ValidationError, match="Expected `int`, got `str`"):
            decode_reports(body) if body.startswith(b"[") else decode_report(body)
    fraction_first = good.replace(b'"seq":1.0', b'"seq":1.5,"seq":3.0')
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int`, got `float` - at `\$.seq`"):
        decode_report(fraction_first)
    assert decode_report(good.replace(b'"seq":1.0', b'"seq":2.0,"seq":3.0')).seq == 3


# -- control records -------------------------------------------------------------------

VALID_CONTROL = {
    "control": "reset_order",
    "robot_id": "amr-7",
    "by": "0123456789ab",
    "requested_at": "2026-11-30T09:43:55.123Z",
}


@st.composite
def controls(draw: st.DrawFn) -> bytes:
    value: dict[str, Any] = dict(VALID_CONTROL)
    key = draw(st.sampled_from([*VALID_CONTROL, "extra"]))
    how = draw(st.sampled_from(["none", "drop", "retype", "trail"]))
    if how == "drop":
        value.pop(key, None)
    elif how == "retype":
        value[key] = draw(ODD_VALUES | st.text(max_size=20))
    text = json.dumps(value)
    if how == "trail":
        text += draw(st.sampled_from(["x", "}", " ", "\x00"]))
    return text.encode("utf-8", "surrogatepass")


@given(body=st.binary(max_size=256) | controls())
@example(body=json.dumps(VALID_CONTROL).encode())
@fuzzed(400)
def test_the_control_decoder_refuses_only_with_its_errors(body: bytes) -> None:
    try:
        control = decode_control(body)
    except DECODE_ERRORS:
        return
    assert control.control == "reset_order"
    assert ROBOT_ID.fullmatch(control.robot_id)
    assert re.fullmatch(r"[0-9a-f]{12}", control.by)
    assert control.requested_at.utcoffset() is not None
    assert decode_control(encode_control(control)) == control
    assert isinstance(control, Control)


# -- the dataflow's classify -----------------------------------------------------------

ARRIVALS = st.sampled_from(
    [int(NOW.timestamp() * 1000), 0, -62_135_596_800_000, 253_402_300_799_000]
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """A key and a value: mostly the key of the report's own robot (the ingest's way)."""
    value = draw(BODIES | st.none())
    key = draw(st.sampled_from(["amr-1", "!dlq", ""]) | ID)
    if value and draw(st.booleans()):
        with contextlib.suppress(ValueError, KeyError, TypeError, RecursionError):
            key = json.loads(value)["robot_id"]
    return str(key), value


def test_classify_never_raises_and_passes_only_reports_in_the_contract() -> None:
    seen: Counter[str] = Counter()

    @given(message=messages(), arrival_ms=ARRIVALS)
    @fuzzed(250)
    def check(message: tuple[str, bytes | None], arrival_ms: int) -> None:
        key, value = message
        out = classify((key, value, "", 3, 17, arrival_ms), RULES)
        if isinstance(out, DeadLetter):
            seen[out.kind] += 1
            assert out.kind in {"invalid", "key", "future", "past"}
            assert (out.key, out.value, out.partition, out.offset) == (key.encode(), value, 3, 17)
            assert out.reason
            return
        seen["report"] += 1
        in_contract(out)
        round_trips(out)
        assert out.robot_id == key
        ahead = out.ts.timestamp() - arrival_ms / 1000
        assert -RULES.max_age_s <= ahead <= RULES.max_future_s

    check()
    assert all(seen[kind] >= 3 for kind in ("report", "invalid", "key", "future", "past")), seen


# -- the fast single-post path against Litestar's route --------------------------------


class Acknowledging:
    """Kafka's side of a post, as far as deciding accept/refuse goes: every send is
    acknowledged and kept (no broker in the unit tests)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, reports: list[tuple[bytes, bytes, Any]]) -> None:
        self.sent.extend(value for _key, value, _headers in reports)

    def start(self) -> None: ...

    def close(self, timeout_s: float = 10.0) -> int:
        return 0

    def ready(self, timeout_s: float = 1.0) -> str | None:
        return None


TOKEN = new_token()


@pytest.fixture(scope="module")
def paths(settings: Settings) -> Iterator[tuple[TestClient[Any], TestClient[Any], Acknowledging]]:
    """A client of the app with the fast path, one of the same app without it."""
    s = msgspec.structs.replace(
        settings,
        api_tokens=f"ingest:{hash_token(TOKEN)}",
        trace_sample_ratio=0.0,
        max_age_s=10 * 365 * 86_400.0,  # the generated ts of the cases are all in range
        max_future_s=365 * 86_400.0,
    )
    kafka = Acknowledging()
    fast = create_app(s, query=False, producer=kafka)  # type: ignore[arg-type]
    plain = create_app(s, query=False, producer=kafka)  # type: ignore[arg-type]
    plain.single_report = None
    assert fast.single_report is not None
    with TestClient(fast) as a, TestClient(plain) as b:
        yield a, b, kafka


MEDIA_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        " application/json ",
        "application/json;",
        "text/plain",
        "application/jsonx",
        "",
    ]
)


def test_the_fast_path_and_litestars_route_answer_a_body_alike(
    paths: tuple[TestClient[Any], TestClient[Any], Acknowledging],
) -> None:
    fast, plain, kafka = paths
    seen: Counter[int] = Counter()

    @given(body=BODIES, media_type=MEDIA_TYPES, signed_in=st.booleans())
    @example(body=b'{"robot_id":"amr-1","seq":7.0,"ts":"2026-11-30T12:00:00Z","status":"idle",'
             b'"battery":50,"pose":{"x":0,"y":0,"theta":0}}', media_type="application/json",
             signed_in=True)  # fmt: skip
    @fuzzed(150)
    def check(body: bytes, media_type: str, signed_in: bool) -> None:
        headers = {"Content-Type": media_type} if media_type else {}
        if signed_in:
            headers["Authorization"] = f"Bearer {TOKEN}"
        before = len(kafka.sent)
        a = fast.post("/v1/reports", content=body, headers=headers)
        sent_fast = kafka.sent[before:]
        b = plain.post("/v1/reports", content=body, headers=headers)
        sent_plain = kafka.sent[before + len(sent_fast) :]
        assert (a.status_code, a.json()) == (b.status_code, b.json()), (body, media_type)
        assert sent_fast == sent_plain  # the same record, or none
        seen[a.status_code] += 1
        if a.status_code == 202:
            assert a.json() == {"accepted": 1}
            (record,) = sent_fast
            in_contract(decode_report(record))

    check()
    assert set(seen) <= {202, 401, 415, 422}, seen
    assert all(seen[status] >= 3 for status in (202, 401, 415, 422)), seen
