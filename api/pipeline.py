"""The dashboard's pipeline figures, read from the processes' own /metrics.

The ingest servers and the dataflow processes each serve Prometheus text; the dashboard
server reads them every ``dashboard_tick_s`` (:class:`PipelineWatch`), keeps the samples
of the last :data:`WINDOW_S` seconds and turns them into what the pipeline panel shows
(:class:`Pipeline`): reports accepted and applied per second, consumer lag per partition,
dead letters by kind, freshness p50/p99. The browser reads them through the app (the
dashboard's feed and ``GET /v1/dashboard/pipeline``), never from the other ports.

A URL whose host is a name is read at each of the name's addresses (the pods behind a
headless Kubernetes Service: ``http://ingest-pods:58081/metrics`` reads every ingest
pod), each a target of its own, shown by address.

Rates are per series, then summed: a process that restarts resets its counters to zero,
and its drop is read as a restart (its new value is the increase), as Prometheus'
``rate`` does. Quantiles come from the freshness histogram's buckets over the window,
interpolated inside the bucket the quantile falls in (``histogram_quantile``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["WINDOW_S", "Pipeline", "PipelineWatch", "Scrape", "Target", "figures", "parse"]

WINDOW_S = 30.0  # rates and quantiles are over this much of the newest samples
SCRAPE_TIMEOUT_S = 1.5

ACCEPTED = "fleetpulse_ingest_reports_accepted_total"
APPLIED = "fleetpulse_flow_reports_applied_total"
DEAD = "fleetpulse_flow_dead_letters_total"
LAG = "fleetpulse_flow_consumer_lag"
FRESHNESS = "fleetpulse_flow_freshness_seconds_bucket"
_KEPT = (ACCEPTED, APPLIED, DEAD, LAG, FRESHNESS)

Series = tuple[str, tuple[tuple[str, str], ...]]  # metric sample name, sorted labels


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """One /metrics URL as last read: whose it is and whether it answered."""

    url: str
    role: str  # "ingest", "dataflow", or "unknown" (none of our figures in it)
    up: bool
    error: str = ""


class Pipeline(msgspec.Struct, frozen=True, kw_only=True):
    """What the pipeline panel shows; a rate or quantile is None until two reads exist."""

    at: float  # unix time of the newest read
    window_s: float  # the span the rates and quantiles cover
    accepted_per_s: float | None
    applied_per_s: float | None
    dead_letters_per_s: float | None
    accepted_total: float
    applied_total: float
    dead_letters: dict[str, float]  # kind -> total since each process started
    lag: dict[str, float]  # partition -> messages not yet read
    freshness_p50_s: float | None
    freshness_p99_s: float | None
    targets: list[Target]


class Scrape(msgspec.Struct, frozen=True):
    """The kept series of every target at one time."""

    at: float
    values: dict[str, dict[Series, float]]  # url -> series -> value
    targets: list[Target]


def parse(text: str) -> dict[Series, float]:
    """The series the panel uses from one Prometheus text exposition."""
    out: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _KEPT:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def _role(text: str) -> str:
    """Whose /metrics ``text`` is, by the families only that process serves."""
    if "fleetpulse_ingest_reports_accepted" in text:
        return "ingest"
    return "dataflow" if "fleetpulse_flow_" in text else "unknown"


def _increase(old: Mapping[Series, float], new: Mapping[Series, float], name: str) -> float:
    """Sum over the series called ``name`` of how much each grew (a drop is a restart)."""
    total = 0.0
    for series, value in new.items():
        if series[0] != name:
            continue
        before = old.get(series, 0.0)
        total += value - before if value >= before else value
    return total


def _bucket_increase(first: Scrape, last: Scrape) -> dict[float, float]:
    """Freshness bucket counts (le -> count) observed between two scrapes, all targets."""
    out: dict[float, float] = {}
    for url, values in last.values.items():
        old = first.values.get(url, {})
        for series, value in values.items():
            if series[0] != FRESHNESS:
                continue
            le = float(dict(series[1])["le"])
            before = old.get(series, 0.0)
            out[le] = out.get(le, 0.0) + (value - before if value >= before else value)
    return out


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound -> count), None if empty."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):  # beyond the last finite bound: that bound is all we know
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def _totals(scrape: Scrape, name: str) -> float:
    return sum(v for values in scrape.values.values() for s, v in values.items() if s[0] == name)


def figures(samples: Sequence[Scrape]) -> Pipeline:
    """The panel's figures from samples oldest first (at least one)."""
    last = samples[-1]
    first = samples[0]
    span = last.at - first.at
    rates: dict[str, float | None] = {}
    for name in (ACCEPTED, APPLIED, DEAD):
        if span <= 0:
            rates[name] = None
            continue
        grew = sum(
            _increase(first.values.get(url, {}), values, name)
            for url, values in last.values.items()
        )
        rates[name] = grew / span
    dead: dict[str, float] = {}
    lag: dict[str, float] = {}
    for values in last.values.values():
        for (name, labels), value in values.items():
            label = dict(labels)
            if name == DEAD:
                kind = label.get("kind", "?")
                dead[kind] = dead.get(kind, 0.0) + value
            elif name == LAG:
                # A partition moved between processes may still show at its old owner
                # until that process exits; the larger figure is the cautious one.
                part = label.get("partition", "?")
                lag[part] = max(lag.get(part, 0.0), value)
    buckets = _bucket_increase(first, last) if span > 0 else {}
    return Pipeline(
        at=last.at,
        window_s=span,
        accepted_per_s=rates[ACCEPTED],
        applied_per_s=rates[APPLIED],
        dead_letters_per_s=rates[DEAD],
        accepted_total=_totals(last, ACCEPTED),
        applied_total=_totals(last, APPLIED),
        dead_letters=dict(sorted(dead.items())),
        lag=dict(sorted(lag.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)),
        freshness_p50_s=quantile(0.5, buckets),
        freshness_p99_s=quantile(0.99, buckets),
        targets=last.targets,
    )


async def _addresses(url: str) -> list[str]:
    """``url`` once per (IPv4) address of its host; ``url`` itself for a literal address
    or a name that does not resolve now."""
    parsed = httpx.URL(url)
    host = parsed.host
    try:
        ipaddress.ip_address(host)
        return [url]  # a literal address
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parsed.port or 80, type=socket.SOCK_STREAM
        )
    except OSError:
        return [url]  # unresolvable now: reading it says so
    found = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    if not found:
        return [url]
    return [str(parsed.copy_with(host=address)) for address in found]


class PipelineWatch:
    """Reads every target's /metrics on demand and keeps :data:`WINDOW_S` of samples."""

    def __init__(self, urls: Iterable[str], window_s: float = WINDOW_S) -> None:
        self.urls = list(urls)
        self.window_s = window_s
        self._samples: deque[Scrape] = deque()
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def _read(self, client: httpx.AsyncClient, url: str) -> tuple[str, str | None, str]:
        try:
            response = await client.get(url)
        except httpx.HTTPError as exc:
            return url, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.status_code != 200:
            return url, None, f"HTTP {response.status_code}"
        return url, response.text, ""

    async def targets(self) -> list[str]:
        """The URLs to read now: each configured one, or one per address of its host."""
        expanded = await asyncio.gather(*(_addresses(url) for url in self.urls))
        return [u for urls in expanded for u in urls]

    async def scrape(self) -> Scrape:
        """Read every target now (concurrently) and keep the sample."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S)
        urls = await self.targets()
        answers = await asyncio.gather(*(self._read(self._client, u) for u in urls))
        values: dict[str, dict[Series, float]] = {}
        targets: list[Target] = []
        for url, text, error in answers:
            if text is None:
                targets.append(Target(url=url, role="unknown", up=False, error=error))
                continue
            try:
                parsed = parse(text)
            except ValueError as exc:
                targets.append(Target(url=url, role="unknown", up=False, error=f"bad text: {exc}"))
                continue
            values[url] = parsed
            targets.append(Target(url=url, role=_role(text), up=True))
        sample = Scrape(time.time(), values, targets)
        self._samples.append(sample)
        while len(self._samples) > 2 and self._samples[0].at < sample.at - self.window_s:
            self._samples.popleft()
        return sample

    async def current(self, max_age_s: float) -> Pipeline:
        """The figures, reading the targets first if the newest sample is older than
        ``max_age_s`` (one read at a time, however many clients ask)."""
        async with self._lock:
            if not self._samples or self._samples[-1].at < time.time() - max_age_s:
                await self.scrape()
            return figures(list(self._samples))

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
