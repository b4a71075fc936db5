"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against a
running main job: 12 simulated robots on two sites, e-stops frequent enough to see.

What a user would check by looking, checked on values: the page asks for a token and
keeps it in session storage only; every robot the API knows is drawn in its status
colour (read back from the canvas); an e-stop turns its marker red and its alert shows
within 2 s of the report's event time; the pipeline panel shows non-zero rates and
every partition's lag; a click on a robot opens its detail; the trace view draws the
four-span chain of a report posted during the test, found by robot and by trace id;
with 10,000 more robots (written to Redis, then all rewritten every second) the page
keeps drawing (frame times and heap recorded). No console error and no failed request
on the way. Screenshots go to docs/screenshots/ (the README shows them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from deploy.local.browser import LAUNCH_ARGS, chromium
from deploy.local.harness import isolated, report, wait_until
from deploy.local.procs import free_port
from deploy.local.stack import REPO_ROOT, Stack
from fleetpulse.schema import LiveState, Pose, RobotReport
from fleetpulse.settings import Settings, to_env
from state.keys import Keys
from state.writer import RedisStateWriter

SHOTS = REPO_ROOT / "docs" / "screenshots"
ROBOTS = 12
ESTOP = (255, 59, 59)  # STATUS_COLOURS.estop in api/static/dashboard.js
VIEWPORT = {"width": 1500, "height": 900}
JAEGER_UI = "http://127.0.0.1:16686"  # as if a Jaeger web UI ran there: the page links to it


class Job:
    """The main job and what it printed: its settings, tokens and output."""

    def __init__(self, s: Settings, proc: subprocess.Popen[bytes], out: Path) -> None:
        self.s, self.proc, self.out = s, proc, out
        self.read = self.ingest = self.admin = ""

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s.dashboard_port}/"

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.s.dashboard_port}",
            headers={"Authorization": f"Bearer {self.read}"},
            timeout=10,
        )


@pytest.fixture(scope="module")
def job(
    stack: Stack, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Job]:
    tmp = tmp_path_factory.mktemp("dashboard")
    s = isolated(
        settings,
        tmp,
        window_s=5,
        allowed_lateness_s=0.5,
        ingest_port=free_port(),
        query_port=free_port(),
        dashboard_port=free_port(),
        dataflow_metrics_port=free_port(2),
        jaeger_ui_url=JAEGER_UI,
        trace_trust="ingest,admin",  # the trace test posts with a sampled traceparent
    )
    out = tmp / "main.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.local.main", "--robots", str(ROBOTS), "--rate", "1",
             "--", "--site", "north", "--site", "south", "--estop-prob", "0.02", "--seed", "11"],
            env={**os.environ, **to_env(s)}, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    j = Job(s, proc, out)
    try:
        text = wait_until(
            "the main job to print where to look",
            lambda: (
                ((m := re.search(r"read: (fp_\S+)", j.output())) and m.group(0))
                or (proc.poll() is not None and "exited")
            ),
            120,
        )
        assert text != "exited", f"the main job ended early:\n{j.output()}"
        where = j.output()
        # The dashboard is the first place named.
        first = re.search(r"where to look:\n\s+(\S+)\s+(\S+)", where)
        assert first is not None and first.groups() == ("dashboard", j.url), where
        j.read = re.search(r"read: (fp_\S+)", where).group(1)  # type: ignore[union-attr]
        j.ingest = re.search(r"ingest: (fp_\S+)", where).group(1)  # type: ignore[union-attr]
        j.admin = re.search(r"admin: (fp_\S+)", where).group(1)  # type: ignore[union-attr]
        with j.api() as api:
            wait_until(
                f"{ROBOTS} robots with live state",
                lambda: len(api.get("/v1/robots", params={"limit": 100}).json()["items"]) >= ROBOTS,
                90,
            )
        yield j
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium()  # Debian's; installed on first use, a clear failure if it cannot be
    with sync_playwright() as p:
        b = launch(p, path)
        yield b
        b.close()


def launch(p: Playwright, path: str) -> Browser:
    return p.chromium.launch(executable_path=path, args=LAUNCH_ARGS)


class Watched:
    """A page and every console error, page error and failed request it had."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []

        def console(msg: ConsoleMessage) -> None:
            if msg.type in ("error", "warning"):
                self.problems.append(f"console {msg.type}: {msg.text}")

        page.on("console", console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on(
            "requestfailed",
            lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"),
        )
        page.on(
            "response",
            lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"),
        )

    def stats(self) -> dict[str, Any]:
        return self.page.evaluate("window.fleetpulse.stats()")  # type: ignore[no-any-return]

    def clean(self) -> None:
        assert self.problems == [], self.problems


def until(page: Page, expression: str, timeout_s: float = 30) -> Any:
    """Poll a JavaScript expression until it is truthy (the page's CSP forbids the eval
    that Playwright's wait_for_function uses; an evaluate from outside is allowed)."""
    return wait_until(f"the page: {expression}", lambda: page.evaluate(expression), timeout_s)


def log_in(page: Page, job: Job, token: str) -> None:
    page.goto(job.url)
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", token)
    page.click("#login-form button")


@pytest.fixture(scope="module")
def board(browser: Browser, job: Job) -> Iterator[Watched]:
    page = browser.new_page(viewport=VIEWPORT)
    watched = Watched(page)
    log_in(page, job, job.read)
    page.wait_for_selector("#login", state="hidden")
    yield watched
    page.close()


def marker_pixel(page: Page, robot: str) -> tuple[int, int, int] | None:
    """The canvas colour at the centre of ``robot``'s marker (None: not drawn)."""
    rgb = page.evaluate(
        """(id) => {
            const m = window.fleetpulse.markerAt(id);
            if (!m) return null;
            const c = document.getElementById('map'), dpr = window.devicePixelRatio || 1;
            // Copied out through a canvas of its own: the page's is never read back.
            const one = document.createElement('canvas'); one.width = one.height = 1;
            const g = one.getContext('2d');
            g.drawImage(c, Math.round(m.x * dpr), Math.round(m.y * dpr), 1, 1, 0, 0, 1, 1);
            const px = g.getImageData(0, 0, 1, 1).data;
            return [px[0], px[1], px[2]];
        }""",
        robot,
    )
    return None if rgb is None else (rgb[0], rgb[1], rgb[2])


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def overlapped(page: Page, robot: str, others: list[str]) -> bool:
    """Whether another marker is drawn close enough to cover ``robot``'s centre."""
    me = page.evaluate("(id) => window.fleetpulse.markerAt(id)", robot)
    for other in others:
        if other == robot:
            continue
        them = page.evaluate("(id) => window.fleetpulse.markerAt(id)", other)
        if (
            them
            and (me["x"] - them["x"]) ** 2 + (me["y"] - them["y"]) ** 2 < (2.6 * me["radius"]) ** 2
        ):
            return True
    return False


# --- the tests -------------------------------------------------------------------------------
def test_the_page_needs_a_read_token_and_keeps_it_in_session_storage_only(
    browser: Browser, job: Job
) -> None:
    page = browser.new_page(viewport=VIEWPORT)
    try:
        html = httpx.get(job.url, timeout=5)
        assert html.status_code == 200 and job.read not in html.text
        assert "default-src 'self'" in html.headers["content-security-policy"]
        # Without a token no data route answers; the page shows its form.
        assert httpx.get(job.url + "v1/dashboard/config", timeout=5).status_code == 401
        log_in(page, job, "fp_not-a-token")
        until(page, "document.getElementById('login-error').textContent.length > 0")
        assert "not a read token" in page.inner_text("#login-error")
        assert page.evaluate("sessionStorage.length") == 0
        # An ingest token is not a read token either.
        page.fill("#token", job.ingest)
        page.click("#login-form button")
        until(page, "document.getElementById('login-error').textContent.includes('not a read')")
        page.fill("#token", job.read)
        page.click("#login-form button")
        page.wait_for_selector("#login", state="hidden")
        assert page.evaluate("Object.values(sessionStorage)") == [job.read]
        assert page.evaluate("localStorage.length") == 0
        # A reload finds the token in this tab's session and asks for nothing.
        page.reload()
        until(page, "window.fleetpulse.stats().robots > 0")
        assert page.is_hidden("#login")
    finally:
        page.close()


def test_every_robot_is_drawn_in_its_status_colour_without_console_errors(
    board: Watched, job: Job
) -> None:
    with job.api() as api:
        listed = api.get("/v1/robots", params={"limit": 1000}).json()["items"]
    ids = sorted(r["report"]["robot_id"] for r in listed)
    assert len(ids) >= ROBOTS
    page = board.page
    until(page, f"window.fleetpulse.stats().robots >= {len(ids)}", 15)
    until(page, "window.fleetpulse.stats().connected")
    assert sorted(board.stats()["sites"]) == ["north", "south"]
    time.sleep(0.6)  # one throttled redraw after the snapshot
    drawn, checked = [], 0
    for robot in ids:
        if page.evaluate("(id) => window.fleetpulse.markerAt(id)", robot) is not None:
            drawn.append(robot)
    assert drawn == ids, f"not on the map: {sorted(set(ids) - set(drawn))}"
    for robot in ids:
        if overlapped(page, robot, ids):
            continue
        state = page.evaluate("(id) => window.fleetpulse.robot(id)", robot)
        want = hex_rgb(page.evaluate("(r) => window.fleetpulse.colourOf(r)", state))
        got = marker_pixel(page, robot)
        if state["online"] and got != want:
            # A change may land between the read and the pixel: read both again once.
            time.sleep(0.5)
            state = page.evaluate("(id) => window.fleetpulse.robot(id)", robot)
            want = hex_rgb(page.evaluate("(r) => window.fleetpulse.colourOf(r)", state))
            got = marker_pixel(page, robot)
        if state["online"]:
            assert got == want, f"{robot} ({state['status']}) drawn {got}, want {want}"
            checked += 1
    assert checked >= ROBOTS // 2, "too few markers could be checked apart from others"
    # The fleet bar adds up to the summary route's counts.
    with job.api() as api:
        summary = api.get("/v1/fleet/summary").json()
    until(
        page, f"document.querySelector('#fleet-bar .chip b').textContent === '{summary['total']}'"
    )
    chips = page.eval_on_selector_all(
        "#fleet-bar .chip[data-status]",
        "cs => cs.map(c => [c.dataset.status, +c.querySelector('b').textContent])",
    )
    assert sum(n for _, n in chips) == summary["total"]
    # Robots per site, in the site selector.
    options = page.eval_on_selector_all(
        "#site option[data-site]", "os => os.map(o => o.textContent)"
    )
    assert options == [f"{site} · {n}" for site, n in sorted(summary["by_site"].items())]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "dashboard-map.png"))
    board.clean()


def test_an_estop_turns_the_marker_red_and_alerts_within_two_seconds(
    board: Watched, job: Job
) -> None:
    page = board.page
    since_ms = time.time() * 1000

    def estopped() -> tuple[str, dict[str, float]] | None:
        marks = page.evaluate("window.fleetpulse.marks()")
        for key, mark in marks.items():
            robot, _, status = key.rpartition(":")
            if status == "estop" and mark["since"] >= since_ms:
                return robot, mark
        return None

    robot, mark = wait_until("the simulator to e-stop a robot", estopped, 120)
    drawn_after_s = (mark["drawn"] - mark["since"]) / 1000
    assert drawn_after_s <= 2.0, f"{robot}'s e-stop drawn {drawn_after_s:.2f}s after its report"

    def alerted() -> dict[str, Any] | None:
        for a in page.evaluate("window.fleetpulse.alerts()"):
            if a["robot_id"] == robot and a["kind"] == "estop":
                at = datetime.fromisoformat(a["at"]).timestamp() * 1000
                if abs(at - mark["since"]) < 1:
                    return a
        return None

    alert = wait_until(f"{robot}'s estop alert in the feed", alerted, 5)
    seen_after_s = (
        page.evaluate("window.fleetpulse.alertSeen()")[alert["id"]] - mark["since"]
    ) / 1000
    assert seen_after_s <= 2.0, f"{robot}'s estop alert shown {seen_after_s:.2f}s after its report"
    assert page.locator(f"#alerts-feed li[data-robot='{robot}'][data-kind='estop']").count() >= 1
    # Red on the canvas while it stays e-stopped (5-20 s in the simulator).
    state = page.evaluate("(id) => window.fleetpulse.robot(id)", robot)
    if state["status"] == "estop" and not overlapped(
        page, robot, page.evaluate("window.fleetpulse.ids()")
    ):
        time.sleep(0.3)
        assert marker_pixel(page, robot) == ESTOP
    print(
        f"\n{robot}: e-stop drawn {drawn_after_s:.2f}s and alerted {seen_after_s:.2f}s after its report"
    )
    board.clean()


def test_the_pipeline_panel_shows_rates_lag_and_freshness(board: Watched, job: Job) -> None:
    page = board.page

    def figures() -> dict[str, str] | None:
        found = page.eval_on_selector_all(
            "#pipeline .fig",
            "fs => Object.fromEntries(fs.map(f => [f.querySelector('.l').textContent, f.querySelector('.v').textContent]))",
        )
        rates_in = all(found.get(k, "—") not in ("—", "0.0") for k in ("accepted /s", "applied /s"))
        return found if rates_in and found.get("freshness p50", "—") != "—" else None

    shown = wait_until("non-zero rates in the pipeline panel", figures, 30)
    # 12 robots at 1/s: the rates are about 12/s.
    assert 4 <= float(shown["accepted /s"]) <= 30, shown
    assert 4 <= float(shown["applied /s"]) <= 30, shown
    assert re.fullmatch(r"\d+ ms|\d+\.\d+ s", shown["freshness p99"]), shown
    partitions = page.eval_on_selector_all(
        "#pipeline .bar[data-partition]", "bs => bs.map(b => b.dataset.partition)"
    )
    assert sorted(partitions, key=int) == [str(p) for p in range(job.s.kafka_partitions)]
    targets = page.inner_text("#pipeline .targets")
    assert "ingest" in targets and targets.count("dataflow") == 2 and "down" not in targets
    board.clean()


def test_clicking_a_robot_opens_its_detail(board: Watched, job: Job) -> None:
    page = board.page
    robot = "amr-004"
    box = page.locator("#map").bounding_box()
    assert box is not None
    marker = page.evaluate("(id) => window.fleetpulse.markerAt(id)", robot)
    page.mouse.click(box["x"] + marker["x"], box["y"] + marker["y"])
    page.wait_for_selector("#detail:not([hidden])")
    picked = page.inner_text("#detail-id")
    # The click picks the nearest marker: the robot itself unless another sits on it.
    assert picked == robot or overlapped(page, robot, page.evaluate("window.fleetpulse.ids()"))
    page.wait_for_selector("#detail-state [data-status]")
    status = page.get_attribute("#detail-state [data-status]", "data-status")
    assert status == page.evaluate("(id) => window.fleetpulse.robot(id).status", picked)
    with job.api() as api:
        history = api.get(f"/v1/robots/{picked}/history", params={"limit": 100}).json()["items"]

    def charted() -> bool:
        return bool(page.locator("#detail .charts polygon").count())

    # Windows are 5 s here; one closes soon after the job starts.
    wait_until(f"{picked}'s 1-minute statistics charted", charted, 30)
    assert page.evaluate("window.fleetpulse.stats().trail") >= min(len(history), 100) - 5
    text = page.inner_text("#detail-body")
    assert re.search(r"battery\s+\d+\.\d %", text) and "boot" in text and "seq" in text
    with job.api() as api:
        alerts = api.get("/v1/alerts", params={"robot_id": picked, "limit": 20}).json()["items"]
    shown = page.eval_on_selector_all("#detail-alerts li", "ls => ls.map(l => l.dataset.kind)")
    assert shown[: len(alerts) - 2] == [a["kind"] for a in alerts][: len(alerts) - 2]
    page.screenshot(path=str(SHOTS / "dashboard-detail.png"))
    board.clean()


def test_a_retired_robot_leaves_the_map_the_counts_and_its_detail(
    board: Watched, browser: Browser, job: Job
) -> None:
    page = board.page
    robot = f"ret-{uuid.uuid4().hex[:6]}"
    ingest = f"http://127.0.0.1:{job.s.ingest_port}"
    body = report(robot, 1, ts=datetime.now(UTC).isoformat(), site="north", status="idle")
    r = httpx.post(
        f"{ingest}/v1/reports", json=body, headers={"Authorization": f"Bearer {job.ingest}"}
    )
    assert r.status_code == 202, r.text
    until(page, f"window.fleetpulse.ids().includes({robot!r})")
    page.evaluate("(id) => window.fleetpulse.select(id)", robot)
    page.wait_for_selector("#detail:not([hidden])")
    before = page.evaluate("window.fleetpulse.stats().robots")

    r = httpx.post(
        f"{ingest}/v1/robots/{robot}/retire", headers={"Authorization": f"Bearer {job.admin}"}
    )
    assert r.status_code == 202, r.text
    until(page, f"!window.fleetpulse.ids().includes({robot!r})")
    assert page.evaluate("window.fleetpulse.stats().robots") == before - 1
    assert page.is_hidden("#detail")  # its detail closed with it
    board.clean()
    # A fresh page's snapshot does not have it either.
    fresh = browser.new_page(viewport=VIEWPORT)
    try:
        log_in(fresh, job, job.read)
        until(fresh, "window.fleetpulse.stats().loaded")
        ids = fresh.evaluate("window.fleetpulse.ids()")
        assert robot not in ids and len(ids) == before - 1
    finally:
        fresh.close()


def test_the_trace_view_draws_the_four_span_chain_of_a_posted_report(
    board: Watched, job: Job
) -> None:
    page = board.page
    robot = f"amr-dash-{secrets.token_hex(3)}"
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    report = {
        "robot_id": robot, "seq": 7, "boot": 2, "ts": datetime.now(UTC).isoformat(),
        "status": "working", "battery": 64.0, "pose": {"x": 5.0, "y": 6.0, "theta": 0.0},
    }  # fmt: skip
    posted = httpx.post(
        f"http://127.0.0.1:{job.s.ingest_port}/v1/reports",
        json=report,
        headers={
            "Authorization": f"Bearer {job.ingest}",
            "traceparent": f"00-{trace_id}-{parent}-01",
        },
        timeout=10,
    )
    assert posted.status_code == 202, posted.text
    want = ["POST /v1/reports", f"produce {job.s.topic_reports}", "process report", "redis write"]

    def chain() -> list[str] | None:
        page.fill("#trace-query", robot)
        page.click("#trace-form button")
        until(page, "!document.getElementById('trace-note').textContent.startsWith('searching')")
        names = page.eval_on_selector_all(
            "#waterfall-table tr[data-span]", "rs => rs.map(r => r.dataset.span)"
        )
        return names if len(names) == 4 else (time.sleep(1.0) or None)  # type: ignore[func-returns-value]

    names = wait_until("the report's four spans in the trace view", chain, 60)
    assert names == want, page.inner_text("#waterfall")
    services = page.eval_on_selector_all(
        "#waterfall-table tr[data-span]", "rs => rs.map(r => r.dataset.service)"
    )
    assert services == ["fleetpulse-ingest"] * 2 + ["fleetpulse-dataflow"] * 2
    assert trace_id in page.inner_text("#waterfall")
    link = page.get_attribute("#waterfall a", "href")
    assert link == f"{JAEGER_UI}/trace/{trace_id}"
    attributes = page.inner_text("#waterfall-table")
    assert re.search(r"messaging\.kafka\.partition=\d+", attributes)
    assert re.search(r"messaging\.kafka\.offset=\d+", attributes)
    assert "boot=2" in attributes and "seq=7" in attributes and f"robot_id={robot}" in attributes
    # Bars are laid out in time: each span starts at or after its parent.
    lefts = page.eval_on_selector_all(
        "#waterfall-table .span-bar", "bs => bs.map(b => parseFloat(b.style.left))"
    )
    assert lefts == sorted(lefts) and lefts[0] == 0
    # By trace id too.
    page.fill("#trace-query", trace_id)
    page.click("#trace-form button")
    until(page, f"document.getElementById('trace-note').textContent === 'trace {trace_id}'")
    again = page.eval_on_selector_all(
        "#waterfall-table tr[data-span]", "rs => rs.map(r => r.dataset.span)"
    )
    assert again == want
    # An unknown trace id is said so, not drawn.
    with job.api() as api:
        missing = api.get(f"/v1/traces/{secrets.token_hex(16)}")
        bad = api.get("/v1/traces/not-hex")
    assert missing.status_code == 404 and "no trace" in missing.json()["detail"]
    assert bad.status_code == 422 and "trace_id" in bad.json()["detail"]
    page.screenshot(path=str(SHOTS / "dashboard-trace.png"))
    board.clean()


def test_the_dashboard_routes_refuse_bad_input_by_name(job: Job) -> None:
    with job.api() as api:
        cases = {
            "/v1/traces": ("robot_id", 422),
            "/v1/traces?robot_id=bad%20id": ("robot_id", 422),
            "/v1/traces?robot_id=amr-001&limit=0": ("limit", 422),
            "/v1/traces?robot_id=amr-001&limit=51": ("limit", 422),
            "/v1/traces?robot_id=amr-001&robot=x": ("robot", 422),
            "/v1/dashboard/pipeline?verbose=1": ("verbose", 422),
            "/v1/dashboard/feed?last_event_id=yesterday": ("last_event_id", 422),
        }
        for path, (name, status) in cases.items():
            r = api.get(path)
            assert (r.status_code, name in r.text) == (status, True), (path, r.status_code, r.text)
        # The feed answers a good resume id with the stream, and a bad header by name.
        bad = api.get("/v1/dashboard/feed", headers={"Last-Event-ID": "x-y"})
        assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["detail"]
        # Every data route needs the read token.
        for path in ("/v1/dashboard/feed", "/v1/dashboard/pipeline", "/v1/traces?robot_id=a"):
            assert httpx.get(job.url.rstrip("/") + path, timeout=5).status_code == 401


def test_jaeger_away_is_a_503_naming_where_it_was_looked_for() -> None:
    import asyncio

    from api.traces import TraceSource
    from fleetpulse.errors import TracesUnavailable

    url = f"http://127.0.0.1:{free_port()}"
    source = TraceSource(url)

    async def search() -> None:
        try:
            await source.search("amr-001", 5)
        finally:
            await source.close()

    # In a thread of its own: Playwright's sync API keeps an event loop in this one.
    with ThreadPoolExecutor(1) as pool, pytest.raises(TracesUnavailable) as info:
        pool.submit(lambda: asyncio.run(search())).result()
    assert url in str(info.value) and "FLEETPULSE_JAEGER_QUERY_URL" in str(info.value)


def kill_dashboard_server(job: Job) -> Callable[[], None]:
    """SIGKILL the dashboard server's process group; returns a wait for the main job to
    have started it again."""
    pids = re.findall(r"^dashboard\s+started, pid (\d+)", job.output(), re.M)
    os.killpg(int(pids[-1]), signal.SIGKILL)

    def restarted() -> None:
        wait_until(
            "the main job to start the dashboard server again",
            lambda: len(re.findall(r"^dashboard\s+started", job.output(), re.M)) > len(pids),
            30,
        )

    return restarted


def only_the_drop(problems: list[str]) -> bool:
    """Whether every problem is the feed breaking off or refused while the server was down."""
    return all(
        "/v1/dashboard/feed" in p
        or re.fullmatch(
            r"console error: Failed to load resource: net::ERR_(INCOMPLETE_CHUNKED_ENCODING|CONNECTION_REFUSED)",
            p,
        )
        for p in problems
    )


def feed_requests(page: Page) -> list[dict[str, str]]:
    """The headers of every feed request the page makes from now on."""
    seen: list[dict[str, str]] = []
    page.on(
        "request",
        lambda r: "/v1/dashboard/feed" in r.url and seen.append(r.headers),
    )
    return seen


def caught_up(page: Page, job: Job) -> bool:
    """Whether every robot the API lists is on the page at the same (boot, seq) or newer."""
    with job.api() as api:
        listed = api.get("/v1/robots", params={"limit": 1000}).json()["items"]
    for s in listed:
        mine = page.evaluate("(id) => window.fleetpulse.robot(id)", s["report"]["robot_id"])
        if mine is None or (mine["boot"], mine["seq"]) < (s["report"]["boot"], s["report"]["seq"]):
            return False
    return True


def test_the_feed_resumes_with_last_event_id_after_the_server_restarts(
    browser: Browser, job: Job
) -> None:
    page = browser.new_page(viewport=VIEWPORT)
    watched = Watched(page)
    requests = feed_requests(page)
    try:
        log_in(page, job, job.read)
        until(page, "window.fleetpulse.stats().loaded && window.fleetpulse.stats().lastEventId")
        before = watched.stats()
        restarted = kill_dashboard_server(job)
        until(page, "!window.fleetpulse.stats().connected", 10)
        last_id = watched.stats()["lastEventId"]
        restarted()
        until(page, "window.fleetpulse.stats().connected", 30)
        # The reconnect asked for what came after the last id the page had, ...
        assert requests[0].get("last-event-id") is None
        resumed = [h for h in requests[1:] if h.get("last-event-id")]
        assert resumed and resumed[-1]["last-event-id"] == last_id, (requests, last_id)
        # ... got it without a reset or a second snapshot, and is up to date again.
        wait_until("the page to catch up with the API", lambda: caught_up(page, job), 20)
        after = watched.stats()
        assert after["resets"] == 0 and after["snapshots"] == before["snapshots"] == 1
        assert after["connects"] == before["connects"] + 1
        assert only_the_drop(watched.problems), watched.problems
    finally:
        page.close()


def test_a_gap_in_the_change_stream_reloads_the_snapshot(browser: Browser, job: Job) -> None:
    page = browser.new_page(viewport=VIEWPORT)
    watched = Watched(page)
    client = redis.Redis.from_url(job.s.redis_dsn)
    try:
        log_in(page, job, job.read)
        until(page, "window.fleetpulse.stats().loaded && window.fleetpulse.stats().lastEventId")
        restarted = kill_dashboard_server(job)
        until(page, "!window.fleetpulse.stats().connected", 10)
        # While the page is away, the changes after its id are trimmed away (as a long
        # absence would, with FLEETPULSE_CHANGES_LEN); the robots go on reporting.
        client.xtrim(Keys(job.s.redis_prefix).changes, maxlen=0)
        restarted()
        until(page, "window.fleetpulse.stats().resets >= 1", 30)
        until(page, "window.fleetpulse.stats().snapshots >= 2", 10)
        wait_until("the page to catch up with the API", lambda: caught_up(page, job), 20)
        assert watched.stats()["connected"]
        assert only_the_drop(watched.problems), watched.problems
    finally:
        client.close()
        page.close()


# --- 10,000 robots ---------------------------------------------------------------------------
LOAD = 10_000
MEASURE_S = 10.0
BASELINE_S = 5.0


def load_states(seq: int, now: float) -> list[LiveState]:
    """``LOAD`` robots on the two sites, status and pose a function of index and seq."""
    statuses = ("moving", "working", "idle", "charging", "moving", "error")
    ts = datetime.fromtimestamp(now, UTC)
    out = []
    for i in range(LOAD):
        # Scattered over a 60 x 40 m site (a fixed spread per robot), creeping with seq.
        x = (i * 7919 % 6000) / 100 + (seq % 5) * 0.05
        y = (i * 104729 % 4000) / 100
        report = RobotReport(
            robot_id=f"load-{i:05d}", seq=seq, ts=ts, status=statuses[(i + seq) % len(statuses)],
            battery=float((i * 7 + seq) % 100), pose=Pose(x=x, y=y, theta=0.0),
            site="north" if i % 2 else "south",
        )  # fmt: skip
        out.append(
            LiveState(report=report, last_seen=now, online=True, status_since=ts, updated=now)
        )
    return out


class Rewriter(threading.Thread):
    """Rewrites every load robot once a second (new seq), as 10,000 robots at 1/s would."""

    def __init__(self, writer: RedisStateWriter) -> None:
        super().__init__(daemon=True)
        self.writer = writer
        self.stop = threading.Event()
        self.rounds = 0
        self.lagging = 0

    def run(self) -> None:
        seq = 2
        while not self.stop.is_set():
            started = time.monotonic()
            states = load_states(seq, time.time())
            for i in range(0, LOAD, 1000):
                self.writer.write(states[i : i + 1000], [], [])
            self.rounds += 1
            seq += 1
            left = 1.0 - (time.monotonic() - started)
            if left > 0:
                self.stop.wait(left)
            else:
                self.lagging += 1


# Frame intervals as the browser schedules them, and long tasks (main thread busy for
# over 50 ms), over ``ms``; started now, awaited by reading window.__measure.
MEASURE_JS = """(ms) => { window.__measure = new Promise((done) => {
    const frames = [], tasks = [];
    const seen = new PerformanceObserver((list) => { for (const e of list.getEntries()) tasks.push(e.duration); });
    seen.observe({ type: "longtask" });
    let last = performance.now();
    const end = last + ms;
    const tick = (t) => {
        frames.push(t - last); last = t;
        if (t < end) requestAnimationFrame(tick); else { seen.disconnect(); done({ frames, tasks }); }
    };
    requestAnimationFrame(tick);
}); }"""


def summary(measured: dict[str, list[float]], seconds: float) -> dict[str, float]:
    frames, tasks = sorted(measured["frames"]), measured["tasks"]
    return {
        "frames": len(frames),
        "frame_median_ms": round(statistics.median(frames), 1),
        "frame_p95_ms": round(frames[int(len(frames) * 0.95)], 1),
        "frame_max_ms": round(frames[-1], 1),
        "long_tasks": len(tasks),
        "main_thread_blocked_pct": round(100 * sum(tasks) / (seconds * 1000), 1),
    }


def test_ten_thousand_robots_keep_the_page_responsive(browser: Browser, job: Job) -> None:
    client = redis.Redis.from_url(job.s.redis_dsn)
    writer = RedisStateWriter(client, job.s)
    page = browser.new_page(viewport=VIEWPORT)
    watched = Watched(page)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    rewriter = Rewriter(writer)
    try:
        # Baseline, same page and browser: the job's own robots only.
        log_in(page, job, job.read)
        until(page, f"window.fleetpulse.stats().robots >= {ROBOTS}", 30)
        time.sleep(1)
        page.evaluate(MEASURE_JS, BASELINE_S * 1000)
        baseline = summary(page.evaluate("window.__measure"), BASELINE_S)
        heap_before = cdp.send("Performance.getMetrics")["metrics"]
        for i in range(0, LOAD, 1000):
            writer.write(load_states(1, time.time())[i : i + 1000], [], [])
        watched.clean()
        started = time.monotonic()
        page.reload()
        watched.problems.clear()  # the reload itself aborts the open feed request
        until(page, f"window.fleetpulse.stats().robots >= {LOAD + ROBOTS}", 60)
        loaded_s = time.monotonic() - started
        rewriter.start()
        time.sleep(2)  # the feed reaches full flow
        events_before = watched.stats()["events"]
        page.evaluate(MEASURE_JS, MEASURE_S * 1000)
        time.sleep(MEASURE_S / 2)
        # An interaction under load: zoom at the centre, then pick a robot.
        box = page.locator("#map").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -400)
        clicked = time.monotonic()
        page.evaluate("window.fleetpulse.select('load-04321')")
        page.wait_for_selector("#detail-state [data-status]")
        detail_s = time.monotonic() - clicked
        loaded = summary(page.evaluate("window.__measure"), MEASURE_S)
        stats = watched.stats()
        events = stats["events"] - events_before
        feed_s = MEASURE_S + 2 - 2 + detail_s  # from events_before to now, about
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.dblclick("#map")  # fit (its clicks may pick a robot: closed next)
        page.evaluate("window.fleetpulse.select(null)")
        time.sleep(0.5)
        page.screenshot(path=str(SHOTS / "dashboard-10k.png"))
    finally:
        rewriter.stop.set()
        rewriter.join(30)
        page.close()
        client.close()
    heap_baseline = {m["name"]: m["value"] for m in heap_before}["JSHeapUsedSize"]
    draws = sorted(stats["drawTimes"])
    figures = {
        "command": "pytest tests/integration/test_dashboard.py -k ten_thousand",
        "robots": stats["robots"],
        "snapshot_load_s": round(loaded_s, 2),
        "feed_events_per_s": round(events / feed_s),
        "rewrite_rounds": rewriter.rounds,
        "rewrite_rounds_over_1s": rewriter.lagging,
        "baseline_12_robots": baseline,
        "with_10k_robots": loaded,
        "frame_p95_ratio": round(loaded["frame_p95_ms"] / max(1.0, baseline["frame_p95_ms"]), 2),
        "map_draw_ms": {
            "median": round(statistics.median(draws), 1),
            "p95": round(draws[int(len(draws) * 0.95)], 1),
            "max": round(draws[-1], 1),
        },
        "detail_after_select_s": round(detail_s, 2),
        "js_heap_used_mb": {
            "baseline": round(heap_baseline / 2**20, 1),
            "with_10k_robots": round(metrics["JSHeapUsedSize"] / 2**20, 1),
        },
        "dom_nodes": int(metrics["Nodes"]),
        "chromium": browser.version,
        "cores": os.cpu_count(),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (REPO_ROOT / "bench" / "results" / "dashboard-10k.json").write_text(
        json.dumps(figures, indent=2) + "\n"
    )
    print("\n10,000 robots:", json.dumps(figures))
    assert stats["robots"] >= LOAD + ROBOTS
    # The page keeps up with the feed: most changes written while it watched reach it ...
    assert events >= 0.5 * LOAD * rewriter.rounds * MEASURE_S / (MEASURE_S + 2), figures
    # ... and keeps drawing: no frame held for a second (a frozen page would show it).
    assert loaded["frame_max_ms"] < 1000, figures
    assert detail_s < 5, figures
    watched.clean()
