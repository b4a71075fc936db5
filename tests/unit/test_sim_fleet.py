"""The simulator without a network: robot models, the schedule, delivery quirks, the CLI,
and the client's retry and counting against a mock transport."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import httpx
import msgspec
import pytest

from fleetpulse.schema import STATUSES, RobotReport, decode_report, decode_reports, encode
from fleetpulse.settings import load_settings
from sim.cli import SIM_TOKEN_ENV, main, parse_args
from sim.client import Poster, Sender, Tally, _retry_after, drive
from sim.fleet import Delivery, Fleet, FleetConfig, RebootSpec, SilenceSpec, robot_ids

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
QUIET = {"fault_prob": 0.0, "estop_prob": 0.0, "reboot_prob": 0.0}


def run_fleet(until: float, step: float = 1.0, **config: object) -> tuple[Fleet, list[Delivery]]:
    fleet = Fleet(FleetConfig(**config), EPOCH)  # type: ignore[arg-type]
    out: list[Delivery] = []
    t = 0.0
    while t < until:
        t = min(until, t + step)
        out.extend(fleet.advance(t))
    out.extend(fleet.flush(until))
    return fleet, out


def by_robot(deliveries: Sequence[Delivery]) -> dict[str, list[Delivery]]:
    out: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        out[d.report.robot_id].append(d)
    return out


def test_robot_ids_are_zero_padded_and_widen_for_big_fleets() -> None:
    assert robot_ids(3) == ["amr-000", "amr-001", "amr-002"]
    assert robot_ids(1001)[-1] == "amr-1000"
    assert robot_ids(1001)[0] == "amr-0000"


def test_reports_validate_against_the_wire_schema() -> None:
    _, deliveries = run_fleet(
        600,
        robots=6,
        rate=2,
        seed=7,
        sites=("plant-1", "plant-2"),
        clock_skew_s=30,
        fault_prob=0.01,
        estop_prob=0.01,
        reboot_prob=0.005,
    )
    assert len(deliveries) > 6 * 2 * 590
    seen_status = set()
    for d in deliveries:
        wire = encode(d.report)
        assert decode_report(wire) == d.report
        assert d.report.ts.utcoffset() is not None
        assert 0.0 <= d.report.pose.x <= 60.0 and 0.0 <= d.report.pose.y <= 40.0
        assert -math.pi <= d.report.pose.theta <= math.pi
        assert d.report.speed >= 0.0
        seen_status.add(d.report.status)
    # Every status of the contract shows up in ten minutes of six busy robots.
    assert seen_status == set(STATUSES)
    sites = {d.report.robot_id: d.report.site for d in deliveries}
    assert sites["amr-000"] == "plant-1" and sites["amr-001"] == "plant-2"
    # A batch as the client posts it validates as one.
    assert len(decode_reports(encode([d.report for d in deliveries[:50]]))) == 50


def test_without_sites_the_site_is_absent() -> None:
    _, deliveries = run_fleet(5, robots=2)
    assert {d.report.site for d in deliveries} == {None}


def test_errors_are_non_empty_exactly_in_error_status_and_robots_recover() -> None:
    _, deliveries = run_fleet(1800, robots=5, seed=3, fault_prob=0.01, estop_prob=0.01)
    errors = [d.report for d in deliveries if d.report.status == "error"]
    assert errors and all(r.errors for r in errors)
    assert all(not d.report.errors for d in deliveries if d.report.status != "error")
    assert any(d.report.status == "estop" and d.report.speed == 0.0 for d in deliveries)
    for reports in by_robot(deliveries).values():
        statuses = [d.report.status for d in reports]
        for bad in ("error", "estop"):
            if bad in statuses:
                # After its last fault or e-stop the robot is back to something else.
                last = max(i for i, s in enumerate(statuses) if s == bad)
                assert any(s != bad for s in statuses[last + 1 :]) or last > len(statuses) - 25


def test_boot_seq_increase_per_robot_except_deliberate_shuffles_and_duplicates() -> None:
    fleet, deliveries = run_fleet(
        300, robots=5, rate=4, seed=11, shuffle_prob=0.1, duplicate_prob=0.1, reboot_prob=0.01
    )
    assert fleet.shuffled > 20 and fleet.duplicated > 20
    assert len(fleet.reboots) > 0
    late = [d for d in deliveries if d.late and not d.duplicate]
    dups = [d for d in deliveries if d.duplicate]
    assert len(late) == fleet.shuffled and len(dups) == fleet.duplicated
    for robot, reports in by_robot(deliveries).items():
        plain = [d.report.order for d in reports if not (d.late or d.duplicate)]
        assert all(a < b for a, b in pairwise(plain)), robot
        # Nothing is lost: every generated (boot, seq) is delivered, seqs run 0, 1, 2, ...
        orders = sorted({d.report.order for d in reports})
        per_boot: dict[int, list[int]] = defaultdict(list)
        for boot, seq in orders:
            per_boot[boot].append(seq)
        assert list(per_boot) == list(range(len(per_boot)))
        for seqs in per_boot.values():
            assert seqs == list(range(len(seqs)))
    # A late report really arrives after a newer one of its robot.
    for d in late:
        earlier = deliveries[: deliveries.index(d)]
        assert any(
            e.report.robot_id == d.report.robot_id and e.report.order > d.report.order
            for e in earlier
        )
    # A duplicate is the same report twice.
    for d in dups:
        i = deliveries.index(d)
        assert deliveries[i - 1].report == d.report


def test_battery_stays_in_range_and_a_draining_robot_goes_charging_and_back() -> None:
    _, deliveries = run_fleet(3 * 3600, step=60, robots=3, seed=5, **QUIET)
    assert all(0.0 <= d.report.battery <= 100.0 for d in deliveries)
    for robot, reports in by_robot(deliveries).items():
        rs = [d.report for d in reports]
        starts = [i for i in range(1, len(rs)) if rs[i].status == "charging" != rs[i - 1].status]
        assert starts, f"{robot} never charged"
        i = starts[0]
        # It went to charge because it ran low, and drained while working before that.
        assert rs[i].battery <= 31.0
        assert rs[0].battery > rs[i].battery
        j = i
        while rs[j + 1].status == "charging":
            j += 1
        run = [r.battery for r in rs[i : j + 1]]
        assert all(a < b or b == 100.0 for a, b in pairwise(run))
        assert run[-1] >= 89.0
        # Then back to work: it moves again.
        assert "moving" in {r.status for r in rs[j + 1 : j + 120]}


def test_robot_moves_with_heading_and_speed_inside_the_site() -> None:
    _, deliveries = run_fleet(120, robots=1, rate=2, seed=1, **QUIET)
    moving = [d.report for d in deliveries if d.report.status == "moving"]
    assert len(moving) > 20
    for a, b in pairwise(d.report for d in deliveries):
        if a.status == b.status == "moving" and b.speed > 0.5:
            dx, dy = b.pose.x - a.pose.x, b.pose.y - a.pose.y
            assert math.hypot(dx, dy) == pytest.approx(b.speed * 0.5, abs=0.01)
            if math.hypot(dx, dy) > 0.1:
                assert math.atan2(dy, dx) == pytest.approx(b.pose.theta, abs=0.01)


def test_planned_reboot_resets_seq_with_boot_plus_one() -> None:
    fleet, deliveries = run_fleet(
        30, robots=3, rate=2, seed=2, reboots=(RebootSpec("amr-001", 10.0),), **QUIET
    )
    reports = [d.report for d in deliveries if d.report.robot_id == "amr-001"]
    before = [r for r in reports if r.boot == 0]
    after = [r for r in reports if r.boot == 1]
    assert before[-1].seq == len(before) - 1 >= 18
    assert [r.seq for r in after] == list(range(len(after)))
    assert after[0].seq == 0 and after[0].status == "idle"
    (reboot,) = fleet.reboots
    assert reboot.robot_id == "amr-001" and reboot.boot == 1
    assert 10.0 <= reboot.at_s < 10.5
    # The robot is off while it restarts: a gap of 1-3 s without reports.
    gap = (after[0].ts - before[-1].ts).total_seconds()
    assert 1.0 <= gap <= 3.6
    assert {r.boot for d in deliveries for r in [d.report] if r.robot_id != "amr-001"} == {0}


def test_silence_window_has_no_reports_of_that_robot() -> None:
    fleet, deliveries = run_fleet(
        20, robots=3, rate=5, seed=4, silences=(SilenceSpec("amr-002", 5.0, 4.0),), **QUIET
    )
    mine = [d for d in deliveries if d.report.robot_id == "amr-002"]
    assert not [d for d in mine if 5.0 <= d.at < 9.0]
    assert any(4.7 <= d.at < 5.0 for d in mine) and any(9.0 <= d.at < 9.3 for d in mine)
    assert not [
        d
        for d in mine
        if EPOCH + timedelta(seconds=5) <= d.report.ts < EPOCH + timedelta(seconds=9)
    ]
    # Others keep talking; the silent robot's seq carries on without a gap.
    assert len([d for d in deliveries if d.report.robot_id == "amr-000" and 5 <= d.at < 9]) == 20
    assert [d.report.seq for d in mine] == list(range(len(mine)))
    (silence,) = fleet.silences(20.0)
    assert (silence.robot_id, silence.start_s, silence.end_s) == ("amr-002", 5.0, 9.0)
    assert silence.start_ts == EPOCH + timedelta(seconds=5)
    # A silence that has not begun yet did not happen; a running one ends at "now".
    assert fleet.silences(4.0) == []


def test_silences_that_happened_are_clipped_to_now() -> None:
    fleet, _ = run_fleet(7, robots=3, seed=4, silences=(SilenceSpec("amr-002", 5.0, 4.0),))
    (silence,) = fleet.silences(7.0)
    assert (silence.start_s, silence.end_s) == (5.0, 7.0)


def test_random_silences_are_recorded_and_really_silent() -> None:
    fleet, deliveries = run_fleet(600, robots=4, rate=2, seed=9, silence_prob=0.01, **QUIET)
    silences = fleet.silences(600.0)
    assert len(silences) >= 5
    for s in silences:
        assert 3.0 <= s.end_s - s.start_s <= 20.0 or s.end_s == 600.0
        assert not [
            d for d in deliveries if d.report.robot_id == s.robot_id and s.start_s <= d.at < s.end_s
        ]


def test_clock_skew_offsets_ts_per_robot_within_the_bound() -> None:
    _, deliveries = run_fleet(10, robots=8, rate=1, seed=6, clock_skew_s=5.0)
    skews = {d.report.robot_id: (d.report.ts - EPOCH).total_seconds() - d.at for d in deliveries}
    assert all(abs(s) <= 5.0 for s in skews.values())
    assert len({round(s, 3) for s in skews.values()}) == 8
    assert max(abs(s) for s in skews.values()) > 1.0


def test_the_same_seed_gives_the_same_reports_whatever_the_step() -> None:
    config = {"robots": 4, "rate": 3, "seed": 42, "shuffle_prob": 0.1, "duplicate_prob": 0.1}
    _, a = run_fleet(120, step=0.05, **config)
    _, b = run_fleet(120, step=7.0, **config)
    assert [encode(d.report) for d in a] == [encode(d.report) for d in b]
    _, c = run_fleet(120, step=1.0, **{**config, "seed": 43})
    assert [encode(d.report) for d in a] != [encode(d.report) for d in c]


def test_a_fleet_needs_an_aware_epoch() -> None:
    with pytest.raises(ValueError, match="timezone"):
        Fleet(FleetConfig(), datetime(2024, 1, 1))  # naive: the point of the test


# --- command line ------------------------------------------------------------------------


def parse(*argv: str, environ: dict[str, str] | None = None) -> object:
    env = {SIM_TOKEN_ENV: "t"} if environ is None else environ
    return parse_args(list(argv), load_settings(env))


@pytest.mark.parametrize(
    ("argv", "option", "says"),
    [
        (["--rate", "-1"], "--rate", "must be > 0"),
        (["--rate", "0"], "--rate", "must be > 0"),
        (["--rate", "fast"], "--rate", "is not a number"),
        (["--rate", "nan"], "--rate", "not a finite number"),
        (["--robots", "0"], "--robots", "must be >= 1"),
        (["--robots", "2.5"], "--robots", "is not an integer"),
        (["--silence", "amr-001:x:3"], "--silence", "is not ROBOT:START_S:DURATION_S"),
        (["--silence", "amr-001:3"], "--silence", "is not ROBOT:START_S:DURATION_S"),
        (["--silence", "amr-001:3:0"], "--silence", "DURATION_S > 0"),
        (["--silence", "amr-001:-1:2"], "--silence", "START_S must be >= 0"),
        (["--silence", "amr-010:1:2"], "--silence", "'amr-010' is not in the fleet"),
        (["--reboot", "amr-001"], "--reboot", "is not ROBOT:AT_S"),
        (["--reboot", "amr-099:3"], "--reboot", "not in the fleet"),
        (["--shuffle-prob", "1.5"], "--shuffle-prob", "between 0 and 1"),
        (["--duplicate-prob", "-0.1"], "--duplicate-prob", "between 0 and 1"),
        (["--clock-skew-s", "-2"], "--clock-skew-s", "must be >= 0"),
        (["--batch", "0"], "--batch", "must be >= 1"),
        (["--count", "0"], "--count", "must be >= 1"),
        (["--duration", "-5"], "--duration", "must be > 0"),
        (["--site", "a b"], "--site", "is not a site name"),
        (["--url", "localhost:58081"], "--url", "not an http:// or https:// URL"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(
    argv: list[str], option: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err
    assert says in err


def test_a_missing_token_names_the_option_and_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --token" in err and SIM_TOKEN_ENV in err


def test_bad_fleetpulse_settings_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETPULSE_INGEST_PORT", "0")
    assert main(["--token", "t"]) == 2
    assert "FLEETPULSE_INGEST_PORT='0' is not allowed" in capsys.readouterr().err


def test_good_arguments_build_the_fleet_config() -> None:
    opts = parse(
        "--robots", "5", "--rate", "2.5", "--site", "a", "--site", "b", "--seed", "9",
        "--silence", "amr-004:10:5", "--reboot", "amr-000:3", "--batch", "50",
        "--shuffle-prob", "0.1", "--clock-skew-s", "2", "--duration", "30",
    )  # fmt: skip
    fleet = opts.fleet  # type: ignore[attr-defined]
    assert (fleet.robots, fleet.rate, fleet.sites, fleet.seed) == (5, 2.5, ("a", "b"), 9)
    assert fleet.silences == (SilenceSpec("amr-004", 10.0, 5.0),)
    assert fleet.reboots == (RebootSpec("amr-000", 3.0),)
    assert (fleet.shuffle_prob, fleet.clock_skew_s) == (0.1, 2.0)
    assert opts.batch == 50 and opts.duration_s == 30.0  # type: ignore[attr-defined]
    assert opts.url == "http://127.0.0.1:58081" and opts.token == "t"  # type: ignore[attr-defined]


# --- client, against a mock transport ----------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def a_report(seq: int, robot: str = "amr-000") -> RobotReport:
    return decode_report(
        msgspec.json.encode(
            {
                "robot_id": robot,
                "seq": seq,
                "ts": "2024-01-01T00:00:00+02:00",
                "status": "idle",
                "battery": 50.0,
                "pose": {"x": 1.0, "y": 2.0, "theta": 0.0},
            }
        )
    )


def post_all(handler: Handler, reports: list[RobotReport], *, batch: bool) -> Tally:
    async def go() -> Tally:
        tally = Tally()
        poster = Poster(
            "http://sim.test", "tok", tally, concurrency=2, transport=httpx.MockTransport(handler)
        )
        try:
            tally.on_sent(reports)
            await poster.post(reports, batch=batch)
        finally:
            await poster.aclose()
        return tally

    return asyncio.run(go())


def test_503_is_retried_after_retry_after_then_accepted() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "unavailable"})
        return httpx.Response(202, json={"accepted": 1})

    tally = post_all(handler, [a_report(4)], batch=False)
    assert len(calls) == 3
    assert (tally.sent, tally.accepted, tally.retried, tally.unsent) == (1, 1, 2, 0)
    assert tally.retry_causes == {"503": 2}
    assert tally.robots["amr-000"].last == (0, 4)
    request = calls[0]
    assert request.url.path == "/v1/reports"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["content-type"] == "application/json"
    assert decode_report(request.content) == a_report(4)


def test_4xx_counts_every_report_as_rejected_under_its_error_code() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/reports/batch"
        assert len(decode_reports(request.content)) == 3
        body = {"error": "invalid_report", "detail": "bad", "fields": ["[1].battery"]}
        return httpx.Response(422, json=body)

    tally = post_all(handler, [a_report(i) for i in range(3)], batch=True)
    assert tally.rejected == {"invalid_report": 3}
    assert (tally.accepted, tally.retried) == (0, 0)
    assert tally.last_problem == "rejected (invalid_report): bad"


def test_an_error_without_the_api_body_is_counted_by_status() -> None:
    tally = post_all(lambda _: httpx.Response(404, text="nope"), [a_report(1)], batch=False)
    assert tally.rejected == {"http_404": 1}


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), ("0.5", 0.5), ("", 1.0), ("soon", 1.0), ("-3", 0.0), ("99999", 60.0)],
)
def test_retry_after_is_read_and_bounded(header: str, seconds: float) -> None:
    headers = {"Retry-After": header} if header else {}
    assert _retry_after(httpx.Response(503, headers=headers)) == seconds


def test_drive_posts_exactly_count_reports_and_every_one_is_accounted_for() -> None:
    posted: list[RobotReport] = []

    def handler(request: httpx.Request) -> httpx.Response:
        reports = decode_reports(request.content)
        posted.extend(reports)
        return httpx.Response(202, json={"accepted": len(reports)})

    async def go() -> tuple[Tally, str]:
        tally = Tally()
        poster = Poster(
            "http://sim.test", "tok", tally, concurrency=4, transport=httpx.MockTransport(handler)
        )
        sender = Sender(poster, workers=4, batch=7, window_s=0.05)
        fleet = Fleet(FleetConfig(robots=10, rate=50, seed=1), datetime.now(UTC))
        result = await drive(fleet, sender, asyncio.Event(), count=100, duration_s=10)
        await sender.drain(5.0, asyncio.Event())
        await poster.aclose()
        return tally, result.reason

    tally, reason = asyncio.run(go())
    assert reason == "count"
    assert (tally.sent, tally.accepted, tally.unsent) == (100, 100, 0)
    assert len(posted) == 100
    assert sum(r.accepted for r in tally.robots.values()) == 100
    assert len({r.robot_id for r in posted}) == 10
