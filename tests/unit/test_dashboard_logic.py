"""The dashboard's own logic: pipeline figures from metrics text, trace waterfalls from
Jaeger's JSON, and the feed that interleaves ticks with the change stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from api.dashboard import live_feed
from api.pipeline import Scrape, Target, figures, parse, quantile
from api.traces import check_trace_id, waterfall
from fleetpulse.errors import InvalidQuery

INGEST = """\
# HELP fleetpulse_ingest_reports_accepted_total Reports made durable.
# TYPE fleetpulse_ingest_reports_accepted_total counter
fleetpulse_ingest_reports_accepted_total {accepted}
"""

FLOW = """\
# TYPE fleetpulse_flow_reports_applied_total counter
fleetpulse_flow_reports_applied_total {applied}
# TYPE fleetpulse_flow_dead_letters_total counter
fleetpulse_flow_dead_letters_total{{kind="invalid"}} {invalid}
fleetpulse_flow_dead_letters_total{{kind="late"}} 1
# TYPE fleetpulse_flow_consumer_lag gauge
fleetpulse_flow_consumer_lag{{partition="0"}} {lag0}
fleetpulse_flow_consumer_lag{{partition="10"}} 3
# TYPE fleetpulse_flow_freshness_seconds histogram
fleetpulse_flow_freshness_seconds_bucket{{le="0.01"}} {b1}
fleetpulse_flow_freshness_seconds_bucket{{le="0.1"}} {b2}
fleetpulse_flow_freshness_seconds_bucket{{le="1.0"}} {b3}
fleetpulse_flow_freshness_seconds_bucket{{le="+Inf"}} {b3}
fleetpulse_flow_freshness_seconds_count {b3}
fleetpulse_flow_freshness_seconds_sum 1.0
# TYPE unrelated_total counter
unrelated_total 5
"""


def scrape(
    at: float, accepted: float, applied: float, buckets: tuple[int, int, int], **kw: Any
) -> Scrape:
    flow = FLOW.format(
        applied=applied, invalid=kw.get("invalid", 2), lag0=kw.get("lag0", 7),
        b1=buckets[0], b2=buckets[1], b3=buckets[2],
    )  # fmt: skip
    return Scrape(
        at,
        {"i": parse(INGEST.format(accepted=accepted)), "f": parse(flow)},
        [Target(url="i", role="ingest", up=True), Target(url="f", role="dataflow", up=True)],
    )


def test_parse_keeps_only_the_series_the_panel_uses() -> None:
    values = parse(FLOW.format(applied=4, invalid=2, lag0=7, b1=1, b2=2, b3=3))
    names = {name for name, _ in values}
    assert "unrelated_total" not in names
    assert values[("fleetpulse_flow_consumer_lag", (("partition", "10"),))] == 3
    assert values[("fleetpulse_flow_freshness_seconds_bucket", (("le", "0.1"),))] == 2


def test_one_sample_gives_totals_and_no_rates() -> None:
    p = figures([scrape(100.0, 50, 40, (1, 2, 3))])
    assert p.accepted_per_s is None and p.applied_per_s is None and p.freshness_p50_s is None
    assert (p.accepted_total, p.applied_total) == (50, 40)
    assert p.dead_letters == {"invalid": 2, "late": 1}
    assert list(p.lag) == ["0", "10"]  # partitions in numeric order
    assert p.lag == {"0": 7, "10": 3}


def test_rates_and_quantiles_are_over_the_window() -> None:
    first = scrape(100.0, 50, 40, (0, 0, 0))
    last = scrape(110.0, 150, 120, (50, 90, 100), invalid=12)
    p = figures([first, last])
    assert p.window_s == 10
    assert p.accepted_per_s == pytest.approx(10.0)
    assert p.applied_per_s == pytest.approx(8.0)
    assert p.dead_letters_per_s == pytest.approx(1.0)
    # 100 observations: 50 at or below 10 ms, 40 in (10 ms, 100 ms], 10 in (100 ms, 1 s].
    assert p.freshness_p50_s == pytest.approx(0.01)
    assert p.freshness_p99_s == pytest.approx(0.1 + 0.9 * (99 - 90) / 10)


def test_a_restarted_process_counts_its_new_total_as_the_increase() -> None:
    first = scrape(100.0, 500, 400, (10, 10, 10))
    restarted = scrape(105.0, 20, 15, (5, 5, 5))  # counters back near zero
    p = figures([first, restarted])
    assert p.accepted_per_s == pytest.approx(4.0)
    assert p.applied_per_s == pytest.approx(3.0)
    assert p.freshness_p50_s is not None


def test_quantile_edges() -> None:
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {1.0: 0, float("inf"): 0}) is None
    # All beyond the last finite bound: that bound is all that is known.
    assert quantile(0.99, {0.5: 0, 1.0: 0, float("inf"): 10}) == 1.0


def test_a_target_down_is_reported_and_left_out() -> None:
    ok = scrape(100.0, 10, 10, (1, 1, 1))
    down = Scrape(101.0, {"i": ok.values["i"]}, [
        Target(url="i", role="ingest", up=True), Target(url="f", role="unknown", up=False, error="refused"),
    ])  # fmt: skip
    p = figures([ok, down])
    assert p.targets[1].up is False and p.targets[1].error == "refused"
    assert p.applied_total == 0 and p.lag == {}


JAEGER = {
    "traceID": "abc123",
    "processes": {"p1": {"serviceName": "fleetpulse-ingest"}, "p2": {"serviceName": "fleetpulse-dataflow"}},
    "spans": [
        {"spanID": "c", "operationName": "process report", "startTime": 1_000_900, "duration": 30,
         "processID": "p2", "references": [{"refType": "CHILD_OF", "spanID": "b"}],
         "tags": [{"key": "robot_id", "value": "amr-1"}, {"key": "messaging.kafka.offset", "value": 42},
                  {"key": "seq", "value": 7}, {"key": "applied", "value": True}]},
        {"spanID": "a", "operationName": "POST /v1/reports", "startTime": 1_000_000, "duration": 400,
         "processID": "p1", "references": [], "tags": []},
        {"spanID": "b", "operationName": "produce robot.reports", "startTime": 1_000_050, "duration": 300,
         "processID": "p1", "references": [{"refType": "CHILD_OF", "spanID": "a"}],
         "tags": [{"key": "otel.status_code", "value": "ERROR"}]},
        {"spanID": "d", "operationName": "redis write", "startTime": 1_001_000, "duration": 250,
         "processID": "p2", "references": [{"refType": "CHILD_OF", "spanID": "gone"}], "tags": []},
    ],
}  # fmt: skip


def test_waterfall_orders_spans_and_measures_from_the_first() -> None:
    view = waterfall(JAEGER)
    assert [s.name for s in view.spans] == [
        "POST /v1/reports", "produce robot.reports", "process report", "redis write",
    ]  # fmt: skip
    assert [s.offset_us for s in view.spans] == [0, 50, 900, 1000]
    assert view.duration_us == 1250 and view.started_us == 1_000_000
    assert view.services == ["fleetpulse-ingest", "fleetpulse-dataflow"]
    assert view.root == "fleetpulse-ingest: POST /v1/reports" and view.robot_id == "amr-1"
    parents = [s.parent_id for s in view.spans]
    assert parents == [None, "a", "b", None]  # a parent not in the trace: drawn as a root
    assert view.spans[1].error and not view.spans[0].error
    assert view.spans[2].tags == {
        "robot_id": "amr-1",
        "messaging.kafka.offset": 42,
        "seq": 7,
        "applied": True,
    }


def test_an_empty_trace_is_an_empty_view() -> None:
    view = waterfall({"traceID": "x", "spans": []})
    assert view.spans == [] and view.duration_us == 0


@pytest.mark.parametrize(
    ("given", "want"),
    [("ABCDEF0123456789", "abcdef0123456789"), ("1", "0000000000000001"), ("f" * 32, "f" * 32),
     (" 0123456789abcdef0 ", "0" * 15 + "0123456789abcdef0")],
)  # fmt: skip
def test_trace_ids_are_normalised(given: str, want: str) -> None:
    assert check_trace_id(given) == want


@pytest.mark.parametrize("bad", ["", "xyz", "g" * 16, "a" * 33, "../api"])
def test_a_bad_trace_id_names_the_parameter(bad: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        check_trace_id(bad)
    assert info.value.parameter == "trace_id"


async def _changes(items: list[tuple[float, bytes]]) -> AsyncIterator[bytes]:
    for delay, chunk in items:
        await asyncio.sleep(delay)
        yield chunk


def test_the_feed_ticks_at_once_and_between_changes_and_ends_with_them() -> None:
    ticks = 0

    async def tick() -> bytes:
        nonlocal ticks
        ticks += 1
        return b"tick%d" % ticks

    async def run() -> list[bytes]:
        feed = live_feed(_changes([(0.05, b"a"), (0.35, b"b"), (0.0, b"c")]), tick, 0.1)
        return [chunk async for chunk in feed]

    out = asyncio.run(run())
    assert out[0] == b"tick1"  # figures first, without waiting for a change
    assert [c for c in out if not c.startswith(b"tick")] == [b"a", b"b", b"c"]  # order kept
    between = out[out.index(b"a") + 1 : out.index(b"b")]
    assert 2 <= len(between) <= 4 and all(c.startswith(b"tick") for c in between)


def test_closing_the_feed_closes_the_change_stream() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield b"x"
        finally:
            closed.set()

    async def tick() -> bytes:
        return b"t"

    async def run() -> None:
        feed = live_feed(endless(), tick, 0.05)
        got = [await anext(feed) for _ in range(5)]
        assert b"x" in got
        await feed.aclose()
        await asyncio.wait_for(closed.wait(), 1)

    asyncio.run(run())


def test_a_name_with_several_addresses_is_read_at_each(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from api import pipeline

    answers = {
        "ingest-pods": ["10.244.0.7", "10.244.0.9", "10.244.0.7"],
        "one": ["10.0.0.1"],
    }

    async def getaddrinfo(self: Any, host: str, port: int, **_: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    watch = pipeline.PipelineWatch(
        ["http://ingest-pods:58081/metrics", "http://one:9464/metrics",
         "http://127.0.0.1:1/metrics", "http://gone:2/metrics"]
    )  # fmt: skip
    assert asyncio.run(watch.targets()) == [
        "http://10.244.0.7:58081/metrics",
        "http://10.244.0.9:58081/metrics",
        "http://10.0.0.1:9464/metrics",
        "http://127.0.0.1:1/metrics",
        "http://gone:2/metrics",  # not resolvable now: its read says so
    ]
